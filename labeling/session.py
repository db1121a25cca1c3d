"""A labeling session: who labeled what and when, a budget, and the last round's trained state.

Pure Python over numpy/torch: the table functions build one from the catalog, the benchmark and
users drive one directly. The pool, labels, budget, oracle and persistence are the shared selection
core (metaql.selection.core); this module adds LANCET's rounds. `save(dir)` /
`LabelingSession.load(dir)` persist it as JSON plus safetensors (never pickle), so a session
survives a restart and a cached model is reused.

Oracle mode (experiments): give `oracle` (the true label of every pool sample, aligned with
`pool_ids`) and `ask_oracle(ids)` labels samples as a perfect human would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from metaql.errors import IOException, InvalidInputException
from metaql.labeling.dmn import OWAConfig, OWAResult
from metaql.labeling.embedding import TrainConfig
from metaql.labeling.lancet import (LancetConfig, LancetResult, ModelFactory, check_budget,
                                    run_lancet, warm_start)
from metaql.labeling.propagation import Propagated
from metaql.labeling.semigan import SemiGAN
from metaql.labeling.termination import StopDecision
from metaql.selection.core import SelectionSession


class LabelingSession(SelectionSession):
    """Human labels over a pool of sample ids, a labeling budget, and cached LANCET state."""

    kind = "labeling"

    def __init__(self, pool_ids: Sequence[int] | np.ndarray, num_classes: int,
                 budget: int | None = None, oracle: Sequence[int] | np.ndarray | None = None,
                 config: LancetConfig | None = None, make_model: ModelFactory | None = None
                 ) -> None:
        super().__init__(pool_ids, num_classes, budget, oracle)
        self.config = config or LancetConfig()
        self.make_model = make_model
        self.result: LancetResult | None = None
        self.result_key: str | None = None

    # -- LANCET rounds ----------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
            warm: bool = True) -> LancetResult:
        """The round for the current labels; reused while the labeled set is unchanged.

        With warm=True a new round continues training the previous round's model (fewer steps)
        unless the labeled set has grown by `config.retrain_growth` since; warm=False always
        trains from scratch. A fresh model after an earlier round trains `config.retrain_steps`
        steps when that is set.
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
                                 progress=progress, retrain=self.result is not None)
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

    # -- persistence (the shared part: metaql.selection.core) ----------------------------------------
    def _state(self, d: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super()._state(d)
        meta.update(config=config_to_json(self.config), result_key=None)
        if self.result is not None:
            meta.update(_save_result(self.result, d))
            meta["result_key"] = self.result_key
        return tensors, meta

    @classmethod
    def load(cls, directory: str | Path, make_model: ModelFactory | None = None,
             model_from: Callable[[dict[str, Any]], torch.nn.Module] | None = None
             ) -> "LabelingSession":
        """Reads a saved session (checked against its manifest). A cached model other than
        SemiGAN needs `model_from(description)` to rebuild it before its weights are loaded."""
        return super().load(directory, make_model=make_model, model_from=model_from)

    @classmethod
    def _restore(cls, meta: dict[str, Any], t: dict[str, torch.Tensor], d: Path,
                 make_model: ModelFactory | None = None,
                 model_from: Callable[[dict[str, Any]], torch.nn.Module] | None = None) -> "LabelingSession":
        session = cls(t["pool_ids"].numpy(), meta["num_classes"], meta["budget"],
                      t["oracle"].numpy() if "oracle" in t else None,
                      _config_from_json(meta["config"]), make_model)
        if meta.get("result_key"):
            session.result = _load_result(meta, d, model_from)
            session.result_key = meta["result_key"]
        return session


def config_to_json(c: LancetConfig) -> dict[str, Any]:
    """Every knob of a round as JSON: what a session saves, and (less after_stop, which only
    picks from a trained round) what its cache entries are keyed by."""
    out = {"train": c.train.__dict__, "owa": c.owa.__dict__, "semigan": c.semigan,
           "warm_steps": c.warm_steps, "alpha_t": c.alpha_t, "loss_tolerance": c.loss_tolerance,
           "retrain_growth": c.retrain_growth, "after_stop": c.after_stop}
    if c.retrain_steps is not None:
        out["retrain_steps"] = c.retrain_steps     # only when set: the cache keys of earlier rounds hold
    return out


def _config_from_json(j: dict[str, Any]) -> LancetConfig:
    # by keyword: the dataclass's field order is no file format
    return LancetConfig(train=TrainConfig(**j["train"]), owa=OWAConfig(**j["owa"]),
                        semigan=dict(j["semigan"]), warm_steps=j["warm_steps"],
                        alpha_t=j["alpha_t"], loss_tolerance=j["loss_tolerance"],
                        # sessions saved before these knobs existed get the defaults
                        retrain_growth=j.get("retrain_growth", LancetConfig.retrain_growth),
                        retrain_steps=j.get("retrain_steps", LancetConfig.retrain_steps),
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
