"""Diagnosis samples in the model's latent space (papers/004, Section IV, Algorithm 1) and baselines.

Every method takes the latent vectors (N, D) of the data, their labels and predictions, and returns
the positions (into the N rows) of a sample of round(fraction * N) rows, with per-row metadata:
the group it was drawn from and its role.

- maxmargin: a linear max-margin classifier (LinearSVC, one-vs-rest) fitted on the labels; within
  each class, rows are ordered by their margin, the class's decision value minus the best other
  class's (low: near or across the boundary, an outlier; high: an exemplar).
- gmm_full / gmm_spherical: a Gaussian mixture with one component per class (unsupervised); each
  row belongs to its most likely component and is ordered by its log likelihood ratio, the
  component's weighted log density minus the log of the other components' summed densities.
- From every group, a share of the sample proportional to the group's size (largest remainders);
  round(j * share) rows from the low (outlier) end, the rest from the high (exemplar) end.
- stratified_cm: proportional to the cells of the confusion matrix (label, prediction), each
  non-empty cell given at least one row while the budget allows (so a 5% sample still holds the
  small cells of misclassified samples, which a (layer, class, correctness) query needs).
- latent_grid: PCA to min(5, D) components, two bins per component split at its median, the
  same number of rows drawn at random from every non-empty bin (what a bin cannot give goes to
  the others), as the paper's simple latent-space sampling.
- random: uniform without replacement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metaql.errors import InvalidInputException

METHODS = ("maxmargin", "gmm_full", "gmm_spherical", "stratified_cm", "latent_grid", "random")


@dataclass
class Sample:
    positions: np.ndarray      # into the rows given, sorted
    group: np.ndarray          # per chosen row: its class, cluster, cell or bin
    role: np.ndarray           # per chosen row: 'outlier' | 'exemplar' | 'random' | 'cell' | 'bin'
    score: np.ndarray          # per chosen row: the ordering score (NaN where none)


def sample_size(n: int, fraction: float) -> int:
    return int(min(n, max(1, round(fraction * n))))


def diagnosis_sample(latent: np.ndarray, labels: np.ndarray, preds: np.ndarray | None, fraction: float,
                     method: str, j: float = 0.7, seed: int = 0) -> Sample:
    if method not in METHODS:
        raise InvalidInputException(f"method= must be one of {', '.join(METHODS)}, not {method!r}")
    n = len(latent)
    if n == 0:
        raise InvalidInputException("the data set is empty; a sample needs samples to draw from")
    m = sample_size(n, fraction)
    rng = np.random.default_rng(seed)
    if method == "random":
        pos = np.sort(rng.choice(n, m, replace=False))
        return Sample(pos, np.zeros(m, np.int64), np.full(m, "random", object), np.full(m, np.nan))
    if method == "stratified_cm":
        if preds is None:
            raise InvalidInputException("stratified_cm needs predictions: run con.update_predictions(checkpoint) first")
        return _stratified(_cells(labels, preds), m, rng)
    if method == "latent_grid":
        return _grid(latent, m, rng)
    group, score = ratio_order(latent, labels, method, seed)
    return _ends(group, score, m, j)


def ratio_order(latent: np.ndarray, labels: np.ndarray, method: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(group, score) per row: the class or component each row is sorted within, and its (log)
    likelihood ratio or margin; low scores lie at the boundary."""
    if not np.isfinite(latent).all():
        raise InvalidInputException("the latent activations hold NaN or infinite values; a sample cannot be "
                                    "drawn in that space (check the model at this checkpoint)")
    if len(latent) < 2:
        raise InvalidInputException(f"method='{method}' fits a model to the latent space and needs at least 2 samples")
    x = _standardised(latent)
    if method == "maxmargin":
        return _margins(x, labels, seed)
    if method in ("gmm_full", "gmm_spherical"):
        return _gmm_ratios(x, len(np.unique(labels)), method.split("_")[1], seed)
    raise InvalidInputException(f"{method} orders no rows by a likelihood ratio")


def _standardised(latent: np.ndarray) -> np.ndarray:
    x = np.asarray(latent, dtype=np.float64)
    scale = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(scale > 0, scale, 1.0)


def _margins(x: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.svm import LinearSVC
    classes = np.unique(labels)
    if len(classes) < 2:
        raise InvalidInputException("maxmargin needs at least two classes among the data's labels")
    svm = LinearSVC(C=1.0, dual="auto", max_iter=5000, random_state=seed).fit(x, labels)
    d = svm.decision_function(x)
    if d.ndim == 1:     # two classes: one decision value, positive for classes[1]
        d = np.stack([-d, d], axis=1)
    col = np.searchsorted(svm.classes_, labels)
    own = d[np.arange(len(x)), col]
    others = d.copy()
    others[np.arange(len(x)), col] = -np.inf
    return np.asarray(labels), own - others.max(axis=1)


def _gmm_ratios(x: np.ndarray, k: int, covariance: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import logsumexp
    from sklearn.mixture import GaussianMixture
    gmm = GaussianMixture(n_components=min(max(k, 1), len(x)), covariance_type=covariance, random_state=seed,
                          reg_covar=1e-4, max_iter=200).fit(x)
    logp = gmm._estimate_weighted_log_prob(x)       # log(pi_k N(x | mu_k, S_k)), (N, K)
    best = logp.argmax(axis=1)
    own = logp[np.arange(len(x)), best]
    others = logp.copy()
    others[np.arange(len(x)), best] = -np.inf
    rest = logsumexp(others, axis=1) if logp.shape[1] > 1 else np.full(len(x), -np.inf)
    return best, own - rest


def allocate(sizes: np.ndarray, m: int, floor_one: bool = False) -> np.ndarray:
    """m rows shared among groups in proportion to `sizes` (largest remainders), never more than a
    group holds; with floor_one, every non-empty group first gets one row while m allows."""
    sizes = np.asarray(sizes, dtype=np.int64)
    take = np.zeros(len(sizes), np.int64)
    if floor_one:
        order = np.argsort(-sizes, kind="stable")
        for g in order[:m]:
            if sizes[g] > 0:
                take[g] = 1
    left = m - take.sum()
    room = sizes - take
    while left > 0 and room.sum() > 0:
        quota = left * room / room.sum()
        add = np.minimum(np.floor(quota).astype(np.int64), room)
        short = left - add.sum()
        if short > 0:
            rem = np.where(room - add > 0, quota - np.floor(quota), -1.0)
            for g in np.argsort(-rem, kind="stable")[:short]:
                if rem[g] >= 0:
                    add[g] += 1
        if add.sum() == 0:
            break
        take += add
        room -= add
        left -= add.sum()
    return take


def _ends(group: np.ndarray, score: np.ndarray, m: int, j: float) -> Sample:
    """Algorithm 1: per group, round(j * share) from the lowest scores, the rest from the highest."""
    groups, inverse = np.unique(group, return_inverse=True)
    shares = allocate(np.bincount(inverse, minlength=len(groups)), m)
    pos, roles = [], []
    for g, share in enumerate(shares):
        rows = np.flatnonzero(inverse == g)
        rows = rows[np.argsort(score[rows], kind="stable")]
        low = int(round(j * share))
        pos += [rows[:low], rows[len(rows) - (share - low):]]
        roles += [np.full(low, "outlier", object), np.full(share - low, "exemplar", object)]
    pos, roles = np.concatenate(pos), np.concatenate(roles)
    order = np.argsort(pos)
    pos = pos[order]
    return Sample(pos, np.asarray(group)[pos], roles[order], score[pos])


def _cells(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return labels * (int(preds.max(initial=0)) + 1) + preds


def _stratified(cells: np.ndarray, m: int, rng) -> Sample:
    groups, inverse = np.unique(cells, return_inverse=True)
    take = allocate(np.bincount(inverse, minlength=len(groups)), m, floor_one=True)
    pos = np.sort(np.concatenate([rng.choice(np.flatnonzero(inverse == g), t, replace=False)
                                  for g, t in enumerate(take)]))
    return Sample(pos, cells[pos], np.full(len(pos), "cell", object), np.full(len(pos), np.nan))


def _grid(latent: np.ndarray, m: int, rng) -> Sample:
    from sklearn.decomposition import PCA
    x = np.asarray(latent, dtype=np.float64)
    comps = min(5, x.shape[1], max(len(x) - 1, 1))
    z = PCA(n_components=comps, random_state=0).fit_transform(x) if len(x) > 1 else np.zeros((1, 1))
    bits = (z > np.median(z, axis=0)).astype(np.int64)
    bins = bits @ (1 << np.arange(bits.shape[1]))
    groups, inverse = np.unique(bins, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(groups))
    take = _equal_shares(sizes, m)
    pos = np.sort(np.concatenate([rng.choice(np.flatnonzero(inverse == g), t, replace=False)
                                  for g, t in enumerate(take)]))
    return Sample(pos, bins[pos], np.full(len(pos), "bin", object), np.full(len(pos), np.nan))


def _equal_shares(sizes: np.ndarray, m: int) -> np.ndarray:
    """m rows spread equally over groups; a group's shortfall goes to those with room."""
    take = np.zeros(len(sizes), np.int64)
    left = m
    while left > 0:
        open_ = np.flatnonzero(take < sizes)
        if len(open_) == 0:
            break
        each = max(left // len(open_), 1)
        for g in open_:
            add = min(each, sizes[g] - take[g], left)
            take[g] += add
            left -= add
            if left == 0:
                break
    return take
