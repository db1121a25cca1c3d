"""The active-learning and label-cleaning sessions, over the shared selection core.

    ActiveLearningSession   Algorithm 1 of Wang et al. (AAAI 2022): each cycle the caller trains
                            its model on the labeled pool, the unlabeled samples are scored
                            (GRADNORM or any rule) and the K highest are proposed for labeling.
    LabelCleaningSession    Algorithm 1 of Bernhardt et al. (Nat. Commun. 2022): with a budget of
                            annotations, the available sample of highest Phi is relabeled one
                            annotation at a time until a majority forms; the selector's scores
                            are refreshed once `update_every` annotations were spent since the last
                            refresh (the paper: when the count is divisible by b, checked after a
                            sample is cleaned; counting since the last refresh keeps the same rate
                            without skipping a multiple passed mid-sample).

Both are pure Python over numpy (the table functions in active/session_functions.py build them
from the catalog), persist as JSON plus safetensors through the core, and resume after a restart
with nothing lost or counted twice: every count is derived from the saved labels and annotations.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from metaql.errors import InvalidInputException
from metaql.selection.core import SelectionSession, micros


class ActiveLearningSession(SelectionSession):
    """Cycles of train, score the unlabeled pool, propose the `per_cycle` highest."""

    kind = "active_learning"

    def __init__(self, pool_ids, num_classes: int, per_cycle: int, budget: int | None = None,
                 oracle=None) -> None:
        super().__init__(pool_ids, num_classes, budget, oracle)
        if not 0 < per_cycle <= self.pool_ids.size:
            raise InvalidInputException(f"per_cycle must lie in [1, {self.pool_ids.size}] (the pool's size), "
                                        f"got {per_cycle}")
        self.per_cycle = int(per_cycle)
        self.proposals: list[np.ndarray] = []      # the ids proposed in each cycle, in order
        self.checkpoints: list[str] = []           # the checkpoint each cycle was scored at

    @property
    def pending(self) -> np.ndarray:
        """The last cycle's proposed samples still without a label."""
        if not self.proposals:
            return np.zeros(0, dtype=np.int64)
        last = self.proposals[-1]
        return last[~np.isin(last, self.labeled_ids)]

    def propose(self, ids: np.ndarray, scores: np.ndarray, checkpoint: str = "") -> np.ndarray:
        """The unlabeled samples among `ids` of the `per_cycle` highest `scores` (ties: lower id),
        recorded as a new cycle. While the previous cycle's proposals are not all labeled, those
        are returned again and no cycle is counted."""
        if self.pending.size:
            return self.pending
        ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        self.rows(ids)
        keep = ~np.isin(ids, self.labeled_ids)
        ids, scores = ids[keep], scores[keep]
        if ids.size == 0:
            raise InvalidInputException("every pool sample is labeled: there is nothing left to propose")
        k = min(self.per_cycle, ids.size, self.budget_left if self.budget is not None else ids.size)
        if k <= 0:
            raise InvalidInputException(f"the budget of {self.budget} labels is spent")
        order = np.lexsort((ids, -scores))[:k]
        self.proposals.append(ids[order])
        self.rounds += 1
        self.checkpoints.append(checkpoint)
        return self.proposals[-1]

    def cycle(self, train: Callable[[np.ndarray, np.ndarray], Any],
              score: Callable[[Any, np.ndarray], np.ndarray]) -> np.ndarray:
        """One cycle in oracle mode: `train(labeled ids, labels)` returns a model, `score(model,
        unlabeled ids)` their scores; the proposals are labeled by the oracle and returned."""
        model = train(self.labeled_ids, self.labels_of(self.labeled_ids))
        unlabeled = self.unlabeled_ids
        chosen = self.propose(unlabeled, score(model, unlabeled))
        self.ask_oracle(chosen)
        return chosen

    def _state(self, d: Path):
        tensors, meta = super()._state(d)
        sizes = [len(p) for p in self.proposals]
        tensors["proposal_sizes"] = torch.as_tensor(sizes, dtype=torch.long)
        tensors["proposed_ids"] = torch.from_numpy(np.concatenate(self.proposals) if self.proposals
                                                   else np.zeros(0, dtype=np.int64))
        meta.update(per_cycle=self.per_cycle, checkpoints=self.checkpoints)
        return tensors, meta

    @classmethod
    def _restore(cls, meta, t, d, **kwargs):
        s = cls(t["pool_ids"].numpy(), meta["num_classes"], meta["per_cycle"], meta["budget"],
                t["oracle"].numpy() if "oracle" in t else None)
        bounds = np.cumsum([0] + t["proposal_sizes"].tolist())
        ids = t["proposed_ids"].numpy()
        s.proposals = [ids[a:b].copy() for a, b in zip(bounds[:-1], bounds[1:])]
        s.checkpoints = list(meta.get("checkpoints", [""] * len(s.proposals)))
        return s


def majority(counts: np.ndarray) -> np.ndarray:
    """Per row of label counts: whether a majority formed (one class counted more than every
    other, from more than one label in all: the paper's rule)."""
    counts = np.atleast_2d(counts)
    top = np.sort(counts, axis=1)
    second = top[:, -2] if counts.shape[1] > 1 else np.zeros(len(counts))
    return (top[:, -1] > second) & (counts.sum(1) > 1)


class LabelCleaningSession(SelectionSession):
    """Noisy labels, a budget of annotations, the majority rule, and a selector refreshed every
    `update_every` annotations. `initial` holds each pool sample's dataset label (-1: none)."""

    kind = "label_cleaning"

    def __init__(self, pool_ids, num_classes: int, initial: Sequence[int] | np.ndarray, budget: int,
                 update_every: int, oracle=None) -> None:
        super().__init__(pool_ids, num_classes, budget, oracle)
        self.initial = np.asarray(initial, dtype=np.int64)
        if self.initial.shape != self.pool_ids.shape:
            raise InvalidInputException("initial= needs one label (or -1) per pool sample")
        if ((self.initial < -1) | (self.initial >= num_classes)).any():
            raise InvalidInputException(f"initial labels must lie in [0, {num_classes}) or be -1 (none)")
        if update_every < 1:
            raise InvalidInputException(f"update_every must be at least 1 annotation, got {update_every}")
        self.update_every = int(update_every)
        self.annotations: list[tuple[int, int, str, dt.datetime]] = []   # (id, label, by, at)
        self.scores = np.full(self.pool_ids.size, np.nan)     # the selector's Phi, by pool row
        self.spent_at_update = 0
        self.selector = ""      # what the scores came from (the SQL functions: a checkpoint's name)
        # annotations found when the session began: they count toward the majorities, not the budget
        self.spent_before = 0

    def _check_budget(self) -> None:
        # a budget of annotations: a sample may take several, so it may exceed the pool's size
        if self.budget is None or self.budget < 1:
            raise InvalidInputException(f"budget must be a positive number of annotations, got {self.budget}")

    # -- counts -----------------------------------------------------------------------------------
    @property
    def spent(self) -> int:
        return len(self.annotations) - self.spent_before

    @property
    def budget_left(self) -> int:
        return self.budget - self.spent

    def counts(self) -> np.ndarray:
        """(N, C) label counts by pool row: the dataset label plus every annotation."""
        c = np.zeros((self.pool_ids.size, self.num_classes), dtype=np.int64)
        has = self.initial >= 0
        c[np.nonzero(has)[0], self.initial[has]] += 1
        if self.annotations:
            rows = self.rows([a[0] for a in self.annotations])
            np.add.at(c, (rows, np.asarray([a[1] for a in self.annotations])), 1)
        return c

    def annotated(self) -> np.ndarray:
        """Annotations per pool row."""
        n = np.zeros(self.pool_ids.size, dtype=np.int64)
        if self.annotations:
            np.add.at(n, self.rows([a[0] for a in self.annotations]), 1)
        return n

    def cleaned(self) -> np.ndarray:
        """Pool rows relabeled until a majority formed (out of the ranking from then on)."""
        return (self.annotated() > 0) & majority(self.counts())

    def in_progress(self) -> np.ndarray:
        """Pool rows relabeled at least once without a majority yet: they are finished first."""
        return (self.annotated() > 0) & ~majority(self.counts())

    def current_labels(self) -> np.ndarray:
        """Each sample's label now: the majority class, ties kept at the dataset label when it is
        among them, else the lowest tied class; -1 for a sample with no label at all."""
        c = self.counts()
        out = c.argmax(1)
        best = c.max(1)
        keep = (self.initial >= 0) & (c[np.arange(len(c)), np.maximum(self.initial, 0)] == best)
        out[keep] = self.initial[keep]
        out[best == 0] = -1
        return out

    # -- annotations ------------------------------------------------------------------------------
    def annotate(self, ids: Iterable[int], labels: Iterable[int], by: str = "human",
                 at: dt.datetime | None = None) -> int:
        """Appends one annotation per (id, label); an id may repeat. All or nothing: refused
        beyond the budget or for a sample already cleaned. Returns how many were added."""
        ids_a, labels_a = np.asarray(list(ids), dtype=np.int64), np.asarray(list(labels), dtype=np.int64)
        self.check_labels(ids_a, labels_a, one_per_id=False)
        if ids_a.size > self.budget_left:
            raise InvalidInputException(f"{ids_a.size} annotation(s) exceed the budget of {self.budget} "
                                        f"({self.budget_left} left)")
        done = self.pool_ids[self.cleaned()]
        if np.isin(ids_a, done).any():
            raise InvalidInputException(f"sample {int(ids_a[np.isin(ids_a, done)][0])} is already cleaned "
                                        "(its labels have a majority); annotate the candidates instead")
        when = at or dt.datetime.now(dt.timezone.utc)
        self.annotations += [(int(i), int(y), by, when) for i, y in zip(ids_a, labels_a)]
        return int(ids_a.size)

    def label(self, ids, labels, by="human", at=None, overwrite=False) -> int:
        """A label in a cleaning session is one more annotation: nothing is replaced."""
        return self.annotate(ids, labels, by, at)

    # -- the selector -----------------------------------------------------------------------------
    @property
    def update_due(self) -> bool:
        """True once `update_every` annotations were spent since the selector's last refresh."""
        return self.spent - self.spent_at_update >= self.update_every or bool(np.isnan(self.scores).all())

    def update_selector(self, scores: np.ndarray, selector: str = "") -> None:
        """The retrained selector's Phi for every pool sample (by pool row)."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.pool_ids.shape:
            raise InvalidInputException(f"{scores.size} scores for a pool of {self.pool_ids.size} samples")
        self.scores = scores
        self.spent_at_update = self.spent
        self.selector = selector
        self.rounds += 1

    def candidates(self, k: int = 1) -> np.ndarray:
        """The samples to annotate next: those in progress first, then the available (not
        cleaned) samples of highest selector score (ties: lower id)."""
        busy = np.nonzero(self.in_progress())[0]
        free = np.nonzero(~self.cleaned() & ~self.in_progress())[0]
        s = np.where(np.isnan(self.scores[free]), -np.inf, self.scores[free])
        free = free[np.lexsort((self.pool_ids[free], -s))]
        return self.pool_ids[np.concatenate([busy, free])[:k]]

    def clean_one(self, annotator: Callable[[int], int], by: str = "oracle") -> int | None:
        """Algorithm 1's inner loop: annotates the top candidate until a majority forms or the
        budget ends; returns its id (None when the budget or the pool is exhausted)."""
        if self.budget_left <= 0:
            return None
        top = self.candidates(1)
        if top.size == 0:
            return None
        j = int(top[0])
        row = self.rows([j])[0]
        while self.budget_left > 0:
            self.annotate([j], [annotator(j)], by=by)
            if majority(self.counts()[row])[0]:
                break
        return j

    def run(self, annotator: Callable[[int], int], refresh: Callable[["LabelCleaningSession"], np.ndarray],
            by: str = "oracle", on_annotation: Callable[["LabelCleaningSession"], None] | None = None) -> None:
        """Algorithm 1 until the budget is spent: `refresh(session)` retrains the selector and
        returns its Phi per pool row whenever an update is due."""
        while self.budget_left > 0:
            if self.update_due:
                self.update_selector(refresh(self))
            if self.clean_one(annotator, by) is None:
                break
            if on_annotation is not None:
                on_annotation(self)

    # -- persistence ------------------------------------------------------------------------------
    def _state(self, d: Path):
        tensors, meta = super()._state(d)
        a = self.annotations
        tensors.update(initial=torch.from_numpy(self.initial), scores=torch.from_numpy(self.scores),
                       annotation_ids=torch.as_tensor([x[0] for x in a], dtype=torch.long),
                       annotation_labels=torch.as_tensor([x[1] for x in a], dtype=torch.long),
                       annotation_at_us=torch.as_tensor([micros(x[3]) for x in a], dtype=torch.long))
        meta.update(update_every=self.update_every, spent_at_update=self.spent_at_update, selector=self.selector,
                    annotated_by=[x[2] for x in a], spent_before=self.spent_before)
        return tensors, meta

    @classmethod
    def _restore(cls, meta, t, d, **kwargs):
        s = cls(t["pool_ids"].numpy(), meta["num_classes"], t["initial"].numpy(), meta["budget"],
                meta["update_every"], t["oracle"].numpy() if "oracle" in t else None)
        s.scores = t["scores"].numpy().copy()
        s.spent_at_update, s.selector = int(meta["spent_at_update"]), str(meta.get("selector", ""))
        s.spent_before = int(meta.get("spent_before", 0))
        ats = [dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc) for us in t["annotation_at_us"].tolist()]
        s.annotations = list(zip(t["annotation_ids"].tolist(), t["annotation_labels"].tolist(),
                                 meta["annotated_by"], ats))
        return s
