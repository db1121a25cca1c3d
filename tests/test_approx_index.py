"""The projected index's certificate (metaql.approx.indexed): the Chernoff tail of a Gaussian
quadratic form covers Monte-Carlo draws of forms of either sign, it is at the Gaussian rate where
no eigenvalue dominates, and the second rescoring round is the fewest samples meeting the target."""
import numpy as np
import pytest

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
