"""The paper's query sets over one group of samples' activations (rows: samples, columns: neurons),
their metrics, and the same query sets as SQL over ACTIVATIONS (used by the README and the tests).

S1: the top-k neurons by their maximal activation over the group (ties: the lower neuron first).
S2: each neuron's mean activation over the group.
S3: the histogram of each sample's maximally activated neuron (ties: the lower neuron).
Metrics (Section V-A): S1 precision |top_k(sample) & top_k(full)| / k, S2 cosine distance, S3
Jensen-Shannon distance (base 2, so in [0, 1]) between the normalised histograms.
"""
from __future__ import annotations

import numpy as np

# {act}: an ACTIVATIONS(...) call; joined with `samples` for class and correctness where grouped.
S1_SQL = """SELECT neuron, max(value) AS peak FROM {act}
GROUP BY neuron ORDER BY peak DESC, neuron LIMIT {k}"""
S2_SQL = """SELECT neuron, avg(value) AS mean FROM {act} GROUP BY neuron ORDER BY neuron"""
S3_SQL = """SELECT neuron, count(*) AS samples FROM (
  SELECT sample_id, first(neuron ORDER BY value DESC, neuron) AS neuron FROM {act} GROUP BY sample_id)
GROUP BY neuron ORDER BY neuron"""
# the same, per (class, correctness): what the benchmark averages its metrics over
S2_BY_GROUP_SQL = """SELECT s.label, s.label = s.pred AS correct, a.neuron, avg(a.value) AS mean
FROM {act} a JOIN samples s USING (sample_id)
GROUP BY ALL ORDER BY ALL"""


def s1_topk(values: np.ndarray, k: int) -> np.ndarray:
    peak = values.max(axis=0)
    order = np.lexsort((np.arange(len(peak)), -peak))
    return order[:k]


def s2_mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=0)


def s3_histogram(values: np.ndarray) -> np.ndarray:
    return np.bincount(values.argmax(axis=1), minlength=values.shape[1])


def precision(sample_top: np.ndarray, full_top: np.ndarray) -> float:
    return len(np.intersect1d(sample_top, full_top)) / max(len(full_top), 1)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0 if na == nb else 1.0
    return float(1.0 - np.dot(a, b) / (na * nb))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0 if p.sum() == q.sum() else 1.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))
    return float(np.sqrt(max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)))
