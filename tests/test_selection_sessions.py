"""The active-learning and label-cleaning sessions over the shared selection core: the majority
rule and budget accounting on hand-made cases, and a session saved mid-way resumes with nothing
lost or counted twice."""
import numpy as np
import pytest

from metaql.active.sessions import ActiveLearningSession, LabelCleaningSession, majority
from metaql.errors import InvalidInputException, IOException
from metaql.labeling.session import LabelingSession


@pytest.mark.parametrize("counts, formed", [
    ([2, 0, 0], True), ([1, 1, 0], False), ([1, 0, 0], False), ([0, 0, 0], False),
    ([2, 1, 0], True), ([2, 2, 1], False), ([0, 3, 2], True), ([1, 1, 1], False),
])
def test_majority_rule(counts, formed):
    assert majority(np.array([counts]))[0] == formed


def _cleaning(budget=10, update_every=100):
    # dataset labels 0, 1, 2, 0; the truth 0, 2, 2, 1: samples 11 and 13 are mislabeled
    return LabelCleaningSession([10, 11, 12, 13], 3, [0, 1, 2, 0], budget, update_every,
                                oracle=[0, 2, 2, 1])


def _oracle(s):
    return lambda i: int(s.oracle_labels([i])[0])


def test_cleaning_follows_the_ranking_and_counts_each_annotation_once():
    s = _cleaning(budget=6)
    s.update_selector(np.array([0.1, 0.9, 0.5, 0.3]))
    assert s.candidates(4).tolist() == [11, 12, 13, 10]
    assert s.clean_one(_oracle(s)) == 11      # label 1 then 2 -> tie {1, 2}; 2 again -> majority
    assert s.spent == 2 and s.budget_left == 4 and s.cleaned().tolist() == [False, True, False, False]
    assert s.clean_one(_oracle(s)) == 12      # agrees with its dataset label: one annotation
    assert s.spent == 3
    assert s.clean_one(_oracle(s)) == 13      # 0 -> {0: 1, 1: 1} -> {1: 2}
    assert s.spent == 5 and s.current_labels().tolist() == [0, 2, 2, 1]
    assert s.clean_one(_oracle(s)) == 10 and s.budget_left == 0
    assert s.clean_one(_oracle(s)) is None
    with pytest.raises(InvalidInputException, match="exceed the budget"):
        s.annotate([10], [0])
    assert s.spent == 6


def test_budget_ending_mid_sample_leaves_it_in_progress_and_first():
    s = _cleaning(budget=1)
    s.update_selector(np.array([0.1, 0.9, 0.5, 0.3]))
    assert s.clean_one(_oracle(s)) == 11 and s.budget_left == 0
    assert s.in_progress().tolist() == [False, True, False, False]
    s.budget = 4
    s.update_selector(np.array([0.1, 0.0, 0.5, 0.3]))      # a lower score: still first, it is unfinished
    assert s.candidates(2).tolist() == [11, 12]
    with pytest.raises(InvalidInputException, match="exceed the budget of 4"):
        s.annotate([11, 11, 12, 12], [2, 2, 2, 2])
    assert s.spent == 1                                       # all or nothing
    s.annotate([11, 12], [2, 2])
    with pytest.raises(InvalidInputException, match="already cleaned"):
        s.annotate([11], [2])


def test_selector_is_refreshed_every_update_every_annotations():
    s = _cleaning(budget=6, update_every=2)
    refreshed_at = []

    def refresh(session):
        refreshed_at.append(session.spent)
        return np.array([0.1, 0.9, 0.5, 0.3])
    s.run(_oracle(s), refresh)
    assert s.spent == 6 and s.rounds == len(refreshed_at)
    # refreshed first, then before a sample once 2 or more annotations were spent since the last
    assert refreshed_at == [0, 2, 5]      # 11 takes 2, 12 one (3: 1 since), 13 two (5: 3 since)


def test_cleaning_session_resumes_with_nothing_lost_or_counted_twice(tmp_path):
    ref = _cleaning(budget=7, update_every=3)
    scores = lambda session: np.array([0.1, 0.9, 0.5, 0.3]) + session.rounds   # noqa: E731
    ref.run(_oracle(ref), scores)

    s = _cleaning(budget=7, update_every=3)
    s.update_selector(scores(s))
    s.clean_one(_oracle(s))
    s.annotate([13], [1], by="ana")            # mid-sample: {0: 1, 1: 1}, 13 is in progress
    s.save(tmp_path / "clean")
    t = LabelCleaningSession.load(tmp_path / "clean")
    assert t.annotations == s.annotations and t.spent == 3 and t.rounds == 1
    assert t.spent_at_update == 0 and np.array_equal(t.scores, s.scores)
    assert t.in_progress().tolist() == [False, False, False, True] and t.candidates(1).tolist() == [13]
    t.run(_oracle(t), scores)
    # every sample cleaned: 6 annotations either way (ana's counted once), the same labels
    assert t.spent == ref.spent == 6 and t.cleaned().all()
    assert sorted(a[:2] for a in t.annotations) == sorted(a[:2] for a in ref.annotations)
    assert t.current_labels().tolist() == ref.current_labels().tolist() == [0, 2, 2, 1]
    with pytest.raises(IOException, match="label_cleaning session, not a labeling"):
        LabelingSession.load(tmp_path / "clean")


def test_active_learning_cycles_and_resume(tmp_path):
    ids = np.arange(100, 110)
    s = ActiveLearningSession(ids, 2, per_cycle=3, budget=8, oracle=ids % 2)
    s.ask_oracle([100, 101])
    scores = np.arange(10, dtype=float)             # higher id, higher score
    assert s.propose(ids, scores, "c0").tolist() == [109, 108, 107] and s.rounds == 1
    s.label([109], [1], by="ana")
    s.save(tmp_path / "al")
    t = ActiveLearningSession.load(tmp_path / "al")
    assert t.labels == s.labels and t.rounds == 1 and t.checkpoints == ["c0"]
    assert t.pending.tolist() == [108, 107]
    assert t.propose(ids, -scores, "c1").tolist() == [108, 107] and t.rounds == 1   # not a new cycle
    t.ask_oracle(t.pending)
    assert t.propose(ids, scores, "c1").tolist() == [106, 105, 104] and t.rounds == 2
    t.ask_oracle(t.pending)
    assert t.budget_left == 0 and t.n_labeled == 8
    with pytest.raises(InvalidInputException, match="spent"):
        t.propose(ids, scores)


def test_active_learning_cycle_trains_scores_and_asks_the_oracle():
    ids = np.arange(20)
    s = ActiveLearningSession(ids, 2, per_cycle=4, oracle=(ids >= 10).astype(int))
    s.ask_oracle([0, 19])
    seen = []

    def train(labeled, labels):
        seen.append(labeled.tolist())
        return float(labels.mean())

    chosen = s.cycle(train, lambda model, unlabeled: -np.abs(unlabeled - 9.5) + model)
    assert seen == [[0, 19]] and sorted(chosen.tolist()) == [8, 9, 10, 11]
    assert s.n_labeled == 6 and s.labels[10][:2] == (1, "oracle")


# -- the sessions from SQL, across a restart ---------------------------------------------------------
import torch  # noqa: E402
from torch import nn  # noqa: E402

import metaql  # noqa: E402

TRUST = {"trusted_factories": ["tests.test_selection_sessions:Tiny"]}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.metaql_config = {}
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _tiny_store(path, noisy):
    torch.manual_seed(0)
    x, truth = torch.randn(12, 4), np.arange(12) % 3
    con = metaql.connect(str(path), config=TRUST)
    con.add_samples(np.arange(12), "train", noisy, x, columns={"truth": truth})
    con.checkpoint(Tiny(), "c0", lr=1.0)
    return con


def _one(con, sql):
    return dict(zip([d[0] for d in con.execute(sql).description], con.execute(sql).fetchone()))


def test_active_learning_from_sql_resumes_after_a_restart(tmp_path):
    with _tiny_store(tmp_path / "s", None) as con:
        con.label([0, 1, 2], [0, 1, 2], by="ana")
        norms = dict(con.execute("SELECT sample_id, score FROM GRADNORM(pool=train)").fetchall())
        first = con.execute("SELECT sample_id, score, cycle FROM ACTIVE_LEARNING_CANDIDATES(pool=train, k=3)").fetchall()
    top = sorted((i for i in norms if i > 2), key=lambda i: -norms[i])[:3]
    assert [r[0] for r in first] == top and [r[2] for r in first] == [1] * 3
    assert [r[1] for r in first] == pytest.approx([norms[i] for i in top], rel=1e-12)
    with metaql.connect(str(tmp_path / "s"), config=TRUST) as con:      # a restart before labeling
        again = con.execute("SELECT sample_id, score, cycle FROM ACTIVE_LEARNING_CANDIDATES(pool=train, k=3)").fetchall()
        assert [(r[0], r[2]) for r in again] == [(i, 1) for i in top] and again[0][1] is None
        con.label([top[0]], [top[0] % 3])
        status = _one(con, "SELECT * FROM ACTIVE_LEARNING_STATUS(pool=train)")
        assert (status["cycles"], status["n_labeled"], status["pending"], status["model_updated"]) == (1, 4, 2, False)
        con.label(top[1:], [i % 3 for i in top[1:]])
        con.checkpoint(Tiny(), "c1", lr=1.0)
        assert _one(con, "SELECT * FROM ACTIVE_LEARNING_STATUS(pool=train)")["model_updated"]
        second = con.execute("SELECT sample_id, cycle FROM ACTIVE_LEARNING_CANDIDATES(pool=train, k=2, "
                             "oracle=truth)").fetchall()
        assert [r[1] for r in second] == [2, 2] and not set(r[0] for r in second) & set(top + [0, 1, 2])
        labels = dict(con.execute("SELECT sample_id, labeled_by FROM labels").fetchall())
        assert all(labels[r[0]] == "oracle:truth" for r in second)
        assert _one(con, "SELECT * FROM ACTIVE_LEARNING_STATUS(pool=train)")["cycles"] == 2
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*") if p.is_file())
    with metaql.connect(str(tmp_path / "s"), read_only=True, config=TRUST) as con:   # writes nothing
        with pytest.warns(metaql.Warning, match="not saved"):
            con.execute("SELECT * FROM ACTIVE_LEARNING_CANDIDATES(pool=train, k=2)").fetchall()
        with pytest.raises(IOException, match="read-only"):
            con.execute("SELECT * FROM ACTIVE_LEARNING_CANDIDATES(pool=train, k=2, oracle=truth)")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*") if p.is_file()) == files


def test_label_cleaning_from_sql_counts_across_a_restart(tmp_path):
    noisy = np.arange(12) % 3
    noisy[[4, 7]] = [0, 0]                     # two wrong labels
    with _tiny_store(tmp_path / "s", noisy) as con:
        with pytest.raises(metaql.Error, match="budget=..."):
            con.execute("SELECT * FROM LABEL_CLEANING_STATUS(data=train)")
        with pytest.raises(metaql.BinderException, match=r"yet, and update_every= not given.*e\.g\. 10"):
            con.execute("SELECT * FROM LABEL_CLEANING_CANDIDATES(data=train, budget=6, k=1)")
        with pytest.raises(metaql.InvalidInputException, match=r"samples\.split does not hold numbers \(e\.g\. 'train'\)"):
            con.execute("SELECT * FROM LABEL_CLEANING_SCORE(data=train, label_column=split)")
        phi = dict(con.execute("SELECT sample_id, score FROM LABEL_CLEANING_SCORE(data=train)").fetchall())
        got = con.execute("SELECT sample_id, score, annotations FROM LABEL_CLEANING_CANDIDATES(data=train, budget=6, "
                          "update_every=4, k=2)").fetchall()
        best = sorted(phi, key=lambda i: (-phi[i], i))[:2]
        assert [r[0] for r in got] == best and [r[2] for r in got] == [0, 0]
        assert [r[1] for r in got] == pytest.approx([phi[i] for i in best], rel=1e-12)
        con.annotate([best[0]], [(best[0] + 1) % 3], by="ana")    # disagrees with its label: no majority
    with metaql.connect(str(tmp_path / "s"), config=TRUST) as con:
        status = _one(con, "SELECT * FROM LABEL_CLEANING_STATUS(data=train)")
        assert (status["spent"], status["budget"], status["in_progress"], status["cleaned"]) == (1, 6, 1, 0)
        assert (status["since_update"], status["update_due"]) == (1, False)
        got = con.execute("SELECT sample_id, in_progress FROM LABEL_CLEANING_CANDIDATES(data=train, k=1, "
                          "oracle=truth)").fetchall()
        assert got == [(best[0], True)]                            # the unfinished sample first
        status = _one(con, "SELECT * FROM LABEL_CLEANING_STATUS(data=train)")
        assert status["cleaned"] == 1 and status["in_progress"] == 0 and status["spent"] >= 2
        assert status["update_due"] == (status["spent"] >= 4)
        con.checkpoint(Tiny(), "c1", lr=1.0)                       # the selector retrained
        assert _one(con, "SELECT * FROM LABEL_CLEANING_STATUS(data=train)")["since_update"] == 0
        n = con.execute("SELECT count(*) FROM annotations").fetchone()[0]
        assert n == status["spent"]


def test_label_cleaning_budget_counts_only_annotations_made_in_the_session(tmp_path):
    noisy = np.arange(12) % 3
    with _tiny_store(tmp_path / "s", noisy) as con:
        con.annotate([3, 5], [0, 2], by="earlier")               # before any session: evidence, not spending
        con.label([6], [0], by="earlier")
        con.execute("SELECT * FROM LABEL_CLEANING_CANDIDATES(data=train, budget=2, update_every=4, k=1)").fetchall()
        status = _one(con, "SELECT * FROM LABEL_CLEANING_STATUS(data=train)")
        assert (status["spent"], status["budget_left"]) == (0, 2)
        con.annotate([1], [1], by="ana")
    with metaql.connect(str(tmp_path / "s"), config=TRUST) as con:   # the baseline survives a restart
        status = _one(con, "SELECT * FROM LABEL_CLEANING_STATUS(data=train)")
        assert (status["spent"], status["budget_left"]) == (1, 1)
