"""The projected index's certificate (metaql.approx.indexed): the Chernoff tail of a Gaussian
quadratic form covers Monte-Carlo draws of forms of either sign, it is at the Gaussian rate where
no eigenvalue dominates, and the second rescoring round is the fewest samples meeting the target."""
import numpy as np
import pytest
import torch

from metaql.approx.indexed import next_round, stage_tail

SPECTRA = {
    "equal, mixed signs": np.array([1.0] * 8 + [-1.0] * 8),
    "one negative (chi-square upper tail)": np.array([-1.0]),
    "one positive": np.array([1.0]),
    "decaying, mixed": np.array([3.0, -2.0, 1.0, -0.5, 0.25, 0.1]),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_chernoff_tail_covers_quadratic_forms(name):
    """P(sum_j lam_j (chi^2_1 - 1) <= -g) <= stage_tail(g, ||lam||_2, max |lam|), over 200,000 draws."""
    lam = SPECTRA[name]
    rng = np.random.default_rng(7)
    draws = 200_000
    e = (rng.standard_normal((draws, len(lam))) ** 2 - 1.0) @ lam
    fro, top = np.sqrt((lam ** 2).sum()), np.abs(lam).max()
    sd = np.sqrt(2.0) * fro
    for mult in (0.5, 1.0, 2.0, 3.0, 4.0):
        g = mult * sd
        bound = float(stage_tail(np.array([g]), np.array([fro]), np.array([top]))[0])
        seen = float(np.mean(e <= -g))
        assert seen <= bound + 3.0 * np.sqrt(max(bound, 1.0 / draws) / draws), (name, mult, seen, bound)


def test_chernoff_tail_is_at_the_gaussian_rate():
    """With no dominant eigenvalue (L -> 0) the tail is exp(-g^2 / (2 Var)), Var = 2 F^2: at three
    standard deviations about 0.011 (the earlier split-by-sign bound gave 2 exp(-9/4) = 0.21)."""
    fro, g = np.array([1.0]), np.array([3.0 * np.sqrt(2.0)])
    assert stage_tail(g, fro, np.array([0.0]))[0] == pytest.approx(np.exp(-4.5), rel=1e-9)
    assert stage_tail(g, fro, np.array([1e-3]))[0] < 0.012
    assert stage_tail(np.array([0.0, -1.0]), np.ones(2), np.ones(2)).tolist() == [1.0, 1.0]
    assert stage_tail(np.array([1.0]), np.array([0.0]), np.array([0.0]))[0] == 0.0     # an absent stage


def test_next_round_is_the_fewest_meeting_the_target():
    rng = np.random.default_rng(3)
    for trial in range(50):
        n = int(rng.integers(5, 60))
        miss = rng.random(n) ** 3
        rescored = rng.random(n) < 0.3
        miss[rescored] = 0.0
        order = rng.permutation(n)
        allowed = float(rng.random() * miss.sum())
        todo = next_round(miss, allowed, order, rescored)
        assert not rescored[todo].any() and len(set(todo.tolist())) == len(todo)
        left = miss[~rescored].sum() - miss[todo].sum()
        assert left <= allowed + 1e-12 or len(todo) == (~rescored).sum()
        # one sample fewer (the smallest bound taken) would leave more than allowed
        if len(todo) > 1:
            assert left + miss[todo].min() > allowed - 1e-12


def _subspace_case(d=20, r=2):
    """A training gradient, a query gradient sharing its top directions, and orthonormal U, V of
    rank r (the top singular vectors of a noisy copy of the query: any orthonormal bases are valid)."""
    import torch
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(d, 3, generator=gen, dtype=torch.float64), torch.randn(d, 3, generator=gen, dtype=torch.float64)
    ga = a @ torch.randn(3, d, generator=gen, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=gen,
                                                                                       dtype=torch.float64)
    gq = a @ b.T + 0.1 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(gq + 0.05 * torch.randn(d, d, generator=gen, dtype=torch.float64))
    return ga, gq, u[:, :r].contiguous(), vh[:r].T.contiguous()


def test_subspace_split_is_exact():
    """<G_a, G_q> = c_a . c_q + <G_a^res, R> to rounding, the parts from metaql.approx.subspace."""
    import torch
    from metaql.approx.subspace import exact_coordinates, query_split, residual_rows
    ga, gq, u, v = _subspace_case()
    cq, res = query_split(gq, u, v)
    # G_a as factor rows D^T X with X = I (positions = input dims): the index's own path
    x, dm = torch.eye(20, dtype=torch.float64)[None], ga.T[None]
    ca = exact_coordinates(x, dm, u, v)[0]
    xr, dr = residual_rows(x, dm, u, v)
    ga_res = (dr[0].T @ xr[0])
    assert abs(float(ca @ cq + (ga_res * res).sum() - (ga * gq).sum())) < 1e-10 * float(ga.norm() * gq.norm())
    assert float(res.norm()) < 0.5 * float(gq.norm())          # the case is one where the split helps


def test_subspace_index_error_bounds_hold_over_seeds():
    """Over 200 projection seeds at fixed U, V: the subspace index's estimate c_a . c_q +
    <P^T G_a^res P, P^T R P> is unbiased, its variance within the certified sigma^2 (from the
    residuals' norms), its lower tail within the miss bound; and that sigma is below the plain
    index's (rank 0) on this query sharing the training gradient's top directions."""
    import torch
    from metaql.approx.index import query_norms
    from metaql.approx.indexed import add_layer_bounds, miss_probability
    from metaql.approx.projection import matrices
    from metaql.approx.subspace import query_split
    d, k = 20, 5
    ga, gq, u, v = _subspace_case(d)
    cq, res = query_split(gq, u, v)
    ga_res = ga - u @ (u.T @ ga)
    ga_res = (ga_res - (ga_res @ v) @ v.T).numpy()
    exact_part = float(torch.cat([(u.T @ ga).reshape(-1), (ga @ v).reshape(-1)]) @ cq)
    exact, r = float((ga * gq).sum()), res.numpy()
    errs, bounds = [], []
    for seed in range(200):
        spec = {"seed": seed, "k_in": k, "k_out": k, "din": d, "dout": d}
        p_in, p_out = (p.double().numpy() for p in matrices(seed, d, k, d, k))
        errs.append(exact_part + float(((p_out.T @ ga_res @ p_in) * (p_out.T @ r @ p_in)).sum()) - exact)
        acc = {n: np.zeros(1) for n in ("F_in", "L_in", "F_out", "L_out")}
        norms = {"sq": np.array([float((ga_res ** 2).sum())]), "sqin": np.array([float(((ga_res @ p_in) ** 2).sum())])}
        var = add_layer_bounds(acc, spec, norms, query_norms(spec, res))
        bounds.append({"sigma": np.sqrt(var), **{n: (np.sqrt(v) if n[0] == "F" else v) for n, v in acc.items()}})
    errs = np.array(errs)
    sigma = float(bounds[0]["sigma"][0])
    assert abs(errs.mean()) < 4 * errs.std() / np.sqrt(len(errs))
    assert errs.var() <= sigma ** 2
    spec = {"seed": 0, "k_in": k, "k_out": k, "din": d, "dout": d}          # the plain index's sigma
    plain = add_layer_bounds({n: np.zeros(1) for n in bounds[0] if n != "sigma"}, spec,
                             {"sq": np.array([float((ga ** 2).sum())]), "sqin": np.ones(1)}, query_norms(spec, gq))
    assert sigma < 0.3 * float(np.sqrt(plain[0]))
    stacked = {n: np.concatenate([b[n] for b in bounds]) for n in bounds[0]}
    for gap in (1.0 * sigma, 2.0 * sigma, 3.0 * sigma):
        p = float(miss_probability(np.full(len(errs), gap), stacked, np.arange(len(errs))).mean())
        assert np.mean(errs <= -gap) <= p + 0.05
    assert p < 0.2


def test_first_round_covers_the_reachable_and_stays_bounded():
    """The first round holds every sample whose upper end reaches the k-th best lower end (unless
    capped at FIRST_ROUND k), never fewer than k, and follows the upper-end order."""
    from metaql.approx.execute import SIGMAS
    from metaql.approx.indexed import FIRST_ROUND, first_round
    rng = np.random.default_rng(11)
    for trial in range(40):
        n, k = int(rng.integers(5, 200)), int(rng.integers(1, 30))
        s, sigma = rng.standard_normal(n), rng.random(n) * (0.01 if trial % 2 else 1.0)
        order = np.argsort(-(s + SIGMAS * sigma), kind="stable")
        got = first_round(s, sigma, order, k)
        assert min(k, n) <= len(got) <= max(min(k, n), int(np.ceil(FIRST_ROUND * k)))
        assert (got == order[:len(got)]).all()
        lower = np.sort(s - SIGMAS * sigma)[::-1][min(k, n) - 1]
        reach = np.nonzero(s + SIGMAS * sigma >= lower)[0]
        assert set(reach.tolist()) <= set(got.tolist()) or len(got) == int(np.ceil(FIRST_ROUND * k))


def test_spectral_norm_bounds_the_float64_norm():
    """The spectral norm bound the index uses (with its rounding margins) is never below the float64
    SVD's, and within sqrt(1 + TIGHT) (0.5%) of it, on matrices of decaying spectra up to 300 x 60
    (both orientations; metaql.approx.spectral, tests/test_approx_spectral.py)."""
    import torch
    from metaql.approx.index import spectral_norm
    from metaql.approx.spectral import TIGHT
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        a, b = int(torch.randint(2, 300, (1,), generator=g)), int(torch.randint(2, 60, (1,), generator=g))
        m = torch.randn(a, b, generator=g, dtype=torch.float64) * torch.rand(b, generator=g, dtype=torch.float64) ** 4
        m = m if trial % 2 else m.T
        exact = float(torch.linalg.matrix_norm(m, 2))
        assert exact <= spectral_norm(m) <= (1.0 + TIGHT) ** 0.5 * exact


def test_rows_of_several_shards_are_gathered_in_one_copy_in_order():
    """The rescoring's gather (approx.indexed._gathered): the kept rows of each shard, shard after
    shard, in one tensor per name (float16 kept), and a view of one shard's contiguous rows."""
    from metaql.approx.indexed import _gathered
    torch.manual_seed(0)
    shards = [{"X": torch.randn(6, 3, 2), "DO": torch.randn(6, 4).half()} for _ in range(3)]
    keeps = [np.array([0, 2, 5]), np.array([], dtype=np.int64), np.array([1, 4])]
    found = [(None, keep, tensors) for keep, tensors in zip(keeps, shards) if len(keep)]
    got = _gathered(found)
    for name in ("X", "DO"):
        want = torch.cat([t[name][torch.from_numpy(k)] for k, t in zip(keeps, shards) if len(k)])
        assert got[name].dtype == shards[0][name].dtype and torch.equal(got[name], want)
    one = _gathered([(None, np.array([2, 3, 4]), shards[0])])
    assert one["X"].data_ptr() == shards[0]["X"][2:].data_ptr()        # a view, no copy
