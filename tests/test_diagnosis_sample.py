"""DIAGNOSIS_SAMPLE (issue #22, papers/004 Algorithm 1) on hand-made latent spaces: two Gaussians,
whose boundary is x0 = 0, so the outlier end of each class is the points nearest it and the
exemplar end the farthest; the GMM's likelihood ratio against densities computed by scipy; the
baselines' allocation; and the SQL face (CREATE SET ... AS SELECT ... FROM DIAGNOSIS_SAMPLE)."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from torch import nn

import metaql
from metaql.diagnosis.sampling import _standardised, allocate, diagnosis_sample, ratio_order


def two_gaussians(n=200, seed=0):
    g = np.random.default_rng(seed)
    a = np.c_[g.normal(-3, 1, n), g.normal(0, 0.3, n)]
    b = np.c_[g.normal(3, 1, n), g.normal(0, 0.3, n)]
    return np.r_[a, b], np.r_[np.zeros(n, np.int64), np.ones(n, np.int64)]


def overlap(a, b):
    return len(np.intersect1d(a, b)) / max(len(b), 1)


@pytest.mark.parametrize("method", ["maxmargin", "gmm_full", "gmm_spherical"])
def test_outliers_near_the_boundary_exemplars_far_in_proportion_j(method):
    x, y = two_gaussians()
    s = diagnosis_sample(x, y, None, fraction=0.1, method=method, j=0.7, seed=0)
    assert len(s.positions) == 40 and len(np.unique(s.positions)) == 40
    # a GMM sorts within its clusters (unsupervised), the max-margin sample within the classes
    groups = ratio_order(x, y, method, seed=0)[0]
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        side = 1 if x[rows, 0].mean() < 0 else -1
        toward = x[rows, 0] * side       # larger: nearer the other cluster
        mine = np.isin(s.positions, rows)
        out = s.positions[mine & (s.role == "outlier")]
        ex = s.positions[mine & (s.role == "exemplar")]
        share = len(out) + len(ex)
        assert share == mine.sum() and abs(share - 40 * len(rows) / 400) < 1
        assert len(out) == round(0.7 * share)
        assert overlap(out, rows[np.argsort(-toward)[:len(out)]]) >= 0.85
        # exemplars lie on the far side; a spherical mixture fitted to these elongated clusters also
        # ranks points far along x1 as exemplars, so only the sides are checked there
        assert toward[np.isin(rows, ex)].max() < np.median(toward)
        if method != "gmm_spherical":
            assert overlap(ex, rows[np.argsort(toward)[:len(ex)]]) >= 0.8


def test_gmm_ratio_equals_scipy_densities():
    from sklearn.mixture import GaussianMixture
    x, y = two_gaussians(120, seed=3)
    group, score = ratio_order(x, y, "gmm_full", seed=0)
    z = _standardised(x)
    gmm = GaussianMixture(2, covariance_type="full", random_state=0, reg_covar=1e-4, max_iter=200).fit(z)
    logp = np.stack([np.log(w) + multivariate_normal(m, c).logpdf(z)
                     for w, m, c in zip(gmm.weights_, gmm.means_, gmm.covariances_)], axis=1)
    best = logp.argmax(1)
    want = logp[np.arange(len(z)), best] - logsumexp(np.where(np.eye(2, dtype=bool)[best], -np.inf, logp), axis=1)
    assert (group == best).all()
    np.testing.assert_allclose(score, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("j,role", [(0.0, "exemplar"), (1.0, "outlier")])
def test_j_extremes_take_one_end_only(j, role):
    x, y = two_gaussians(100)
    s = diagnosis_sample(x, y, None, 0.2, "maxmargin", j=j)
    assert len(s.positions) == 40 and (s.role == role).all()


def test_stratified_by_confusion_matrix_covers_every_cell_in_proportion():
    g = np.random.default_rng(0)
    y = g.integers(0, 3, 500)
    pred = np.where(g.random(500) < 0.9, y, (y + 1) % 3)
    s = diagnosis_sample(np.zeros((500, 1)), y, pred, 0.05, "stratified_cm", seed=1)
    cells = y * 3 + pred
    assert len(s.positions) == 25
    held = {c: int((cells[s.positions] == c).sum()) for c in np.unique(cells)}
    assert all(v >= 1 for v in held.values())           # the misclassified cells are represented
    sizes = {c: int((cells == c).sum()) for c in np.unique(cells)}
    for c, v in held.items():
        assert abs(v - 25 * sizes[c] / 500) <= 1.5


def test_latent_grid_equal_per_bin_and_random_reproducible():
    x, y = two_gaussians(150)
    s = diagnosis_sample(x, y, None, 0.1, "latent_grid", seed=0)
    _, counts = np.unique(s.group, return_counts=True)
    assert len(s.positions) == 30 and counts.max() - counts.min() <= 1
    r1 = diagnosis_sample(x, y, None, 0.1, "random", seed=5).positions
    r2 = diagnosis_sample(x, y, None, 0.1, "random", seed=5).positions
    assert (r1 == r2).all() and len(np.unique(r1)) == 30


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(0, 200), st.booleans())
def test_allocate_within_sizes_and_budget(sizes, m, floor_one):
    take = allocate(np.array(sizes), m, floor_one)
    assert (take >= 0).all() and (take <= np.array(sizes)).all()
    assert take.sum() == min(m, sum(sizes))


def test_bad_method_and_missing_predictions():
    x, y = two_gaussians(20)
    with pytest.raises(metaql.InvalidInputException, match="method="):
        diagnosis_sample(x, y, None, 0.1, "vas")
    with pytest.raises(metaql.InvalidInputException, match="update_predictions"):
        diagnosis_sample(x, y, None, 0.1, "stratified_cm")


def test_create_set_from_sql_and_estimate_warning(tmp_path):
    x, y = two_gaussians(60, seed=1)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    with metaql.connect(str(tmp_path / "s.mq")) as con:
        con.add_samples(np.arange(120), "test", y, torch.from_numpy(x).float())
        con.checkpoint(model, "c0", lr=1.0)
        con.update_predictions("c0")
        con.capture_activations(["0"], samples="test", checkpoint="c0")
        con.execute("CREATE SET diag AS SELECT sample_id FROM DIAGNOSIS_SAMPLE(data=test, fraction=0.1, "
                    "method='maxmargin', layer='0', j=0.7, seed=0)")
        ids = con.execute("SELECT sample_id FROM set_members WHERE set_name = 'diag' ORDER BY 1").fetchnumpy()["sample_id"]
        want = diagnosis_sample(x.astype(np.float32), y, None, 0.1, "maxmargin", 0.7, 0).positions
        assert list(ids) == list(want)
        meta = con.execute("SELECT DISTINCT method, role FROM DIAGNOSIS_SAMPLE(data=test, fraction=0.1, layer='0') "
                           "ORDER BY role").fetchall()
        assert meta == [("maxmargin", "exemplar"), ("maxmargin", "outlier")]
        with pytest.warns(metaql.Warning, match="diagnosis sample"):
            con.execute("SELECT avg(value) FROM ACTIVATIONS(layer='0', samples=diag, checkpoint=c0)")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            con.execute("SELECT avg(value) FROM ACTIVATIONS(layer='0', samples=test, checkpoint=c0)")
        # an aggregate over all of test answered from the sample's members only, flagged as an estimate
        with pytest.warns(metaql.Warning, match="answered from diagnosis sample 'diag'.*maxmargin, fraction 0.1"):
            got = con.execute("SELECT neuron, avg(value) AS m FROM ACTIVATIONS(layer='0', samples=test, checkpoint=c0, "
                              "using_sample=diag) GROUP BY neuron ORDER BY neuron").fetchnumpy()["m"]
        np.testing.assert_allclose(got, x[want].mean(0), rtol=1e-5)
        plan = [r[0] for r in con.execute("EXPLAIN SELECT neuron, avg(value) FROM ACTIVATIONS(layer='0', samples=test, "
                                          "checkpoint=c0, using_sample=diag) GROUP BY neuron").fetchall()]
        assert any(f"ESTIMATE from diagnosis sample 'diag': {len(want)} of the 120 samples of 'test'" in l and
                   "maxmargin, fraction 0.1" in l for l in plan)
        assert any("S1 precision" in l or "No error was measured" in l for l in plan)
        plan = [r[0] for r in con.execute("EXPLAIN SELECT * FROM ACTIVATIONS(layer='0', samples=test, checkpoint=c0)").fetchall()]
        assert any("EXACT: every one of the 120 samples of 'test'" in l for l in plan)
        with pytest.raises(metaql.InvalidInputException, match="not a set drawn by DIAGNOSIS_SAMPLE"):
            con.execute("SELECT * FROM ACTIVATIONS(layer='0', samples=test, checkpoint=c0, using_sample=test)")
        # the rest of test (the draw's complement) mentions DIAGNOSIS_SAMPLE but is not a sample: on
        # the old code it was taken for one (an estimate, with the method's measured error)
        con.execute("CREATE SET rest AS SELECT sample_id FROM samples WHERE split = 'test' AND sample_id NOT IN "
                    "(SELECT sample_id FROM DIAGNOSIS_SAMPLE(data=test, fraction=0.1, layer='0'))")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            con.execute("SELECT avg(value) FROM ACTIVATIONS(layer='0', samples=rest, checkpoint=c0)")
        with pytest.raises(metaql.InvalidInputException, match="not a set drawn by DIAGNOSIS_SAMPLE"):
            con.execute("SELECT * FROM ACTIVATIONS(layer='0', samples=test, checkpoint=c0, using_sample=rest)")
        with pytest.raises(metaql.Error, match="latent space"):
            con.execute("SELECT * FROM DIAGNOSIS_SAMPLE(data=test, method='gmm_full')")
        with pytest.raises(metaql.Error, match="fraction"):
            con.execute("SELECT * FROM DIAGNOSIS_SAMPLE(data=test, fraction=0, layer='0')")


def test_drawn_with_reads_the_call_and_its_defaults():
    from metaql.diagnosis.functions import drawn_with
    assert drawn_with("SELECT sample_id FROM DIAGNOSIS_SAMPLE(data=t, method='gmm_full', fraction=0.2)") == ("gmm_full", 0.2)
    assert drawn_with("SELECT sample_id FROM DIAGNOSIS_SAMPLE(data=t, layer=fc2)") == ("maxmargin", 0.05)
