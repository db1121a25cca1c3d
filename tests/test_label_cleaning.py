"""LABEL_CLEANING_SCORE's Phi against hand-computed values, and the annotations table: several
labels per sample appended, none replaced, old stores still readable."""
import math
import numpy as np
import pytest
import torch
from torch import nn

import metaql
from metaql.errors import InvalidInputException, IOException


class Identity3(nn.Module):
    """logits = x: a sample's input is its log-probabilities (up to a constant)."""

    def __init__(self):
        super().__init__()
        self.metaql_config = {}
        self.fc = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3))

    def forward(self, x):
        return self.fc(x)


def _con(path=":memory:"):
    con = metaql.connect(path)
    # p = (1/6, 2/6, 3/6) for sample 0, (1/3, 1/3, 1/3) for 1, (0.8, 0.1, 0.1) for 2
    x = torch.log(torch.tensor([[1 / 6, 2 / 6, 3 / 6], [1 / 3, 1 / 3, 1 / 3], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]]))
    con.add_samples([0, 1, 2, 3], "train", [0, 1, 0, 2], x)
    con.checkpoint(Identity3(), "c0", lr=1.0)
    return con


def _rows(con, sql="SELECT * FROM LABEL_CLEANING_SCORE(data=train) ORDER BY sample_id"):
    return {r[0]: r[1:] for r in con.execute(sql).fetchall()}


def test_phi_equals_hand_computed_values():
    with _con() as con:
        con.annotate([0, 0], [2, 2], by="ana")      # sample 0: labels {0, 2, 2}
        con.label([1], [2], by="bo")                 # sample 1: {1 (dataset), 2 (human)}
        rows = _rows(con)
    l6, l3, l2 = math.log(1 / 6), math.log(1 / 3), math.log(1 / 2)
    h0 = -(l6 / 6 + l3 / 3 + l2 / 2)
    ce0 = -(l6 / 3 + 2 * l2 / 3)
    assert rows[0] == pytest.approx((ce0, h0, ce0 - h0), rel=1e-6)
    # uniform p: CE of any distribution is log 3 = H(p), so Phi = 0
    assert rows[1] == pytest.approx((math.log(3), math.log(3), 0.0), abs=1e-6)
    ce2, h2 = -math.log(0.8), -(0.8 * math.log(0.8) + 0.2 * math.log(0.1))
    assert rows[2] == pytest.approx((ce2, h2, ce2 - h2), rel=1e-6)
    # a confidently contradicted label ranks above an agreeing one
    assert rows[3][2] > rows[2][2]


def test_label_column_and_human_labels_options():
    with _con() as con:
        con.annotate([0], [2])
        con.label([1], [2])
        only_ann = _rows(con, "SELECT * FROM LABEL_CLEANING_SCORE(data=train, label_column='', "
                              "human_labels=false) ORDER BY sample_id")
    assert list(only_ann) == [0]          # samples without any label are left out
    assert only_ann[0][0] == pytest.approx(-math.log(3 / 6))


def test_annotations_append_and_never_replace():
    with _con() as con:
        assert con.annotate([3, 3, 0], [1, 2, 1], by="ana") == 3
        con.execute("INSERT INTO annotations VALUES (3, 1, 'bo', now())")
        rows = con.execute("SELECT sample_id, label, annotated_by FROM annotations ORDER BY sample_id, label, "
                           "annotated_by").fetchall()
        assert rows == [(0, 1, "ana"), (3, 1, "ana"), (3, 1, "bo"), (3, 2, "ana")]
        with pytest.raises(InvalidInputException, match="not registered"):
            con.annotate([99], [1])
        with pytest.raises(InvalidInputException, match="whole number"):
            con.annotate([1], [0.5])
        con.annotate([1], [7])
        with pytest.raises(InvalidInputException, match="not a class"):
            con.execute("SELECT * FROM LABEL_CLEANING_SCORE(data=train)")


def test_store_without_annotations_table_stays_readable(tmp_path):
    path = tmp_path / "s"
    with _con(str(path)) as con:
        con.label([1], [2])
    with metaql.connect(str(path), config={"trusted_factories": ["tests.test_label_cleaning:Identity3"]}) as con:
        con.store.db.execute("DROP TABLE annotations")      # as a store written before the table
    trust = {"trusted_factories": ["tests.test_label_cleaning:Identity3"]}
    with metaql.connect(str(path), read_only=True, config=trust) as con:
        assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'annotations'"
                           ).fetchone() == (0,)
        rows = _rows(con)
        assert set(rows) == {0, 1, 2, 3}
        with pytest.raises(IOException, match="read-only"):
            con.annotate([0], [1])
    with metaql.connect(str(path), config=trust) as con:      # a writable open adds it
        con.annotate([0], [1])
        assert con.execute("SELECT count(*) FROM annotations").fetchone()[0] == 1
