"""The evaluation's numbers: plain numpy on unit embeddings, each testable on hand-made cases
(eq. 15's cosine, the cosine to the identity's mean face, 1:N retrieval, real-vs-real pairs, a
Student-t interval over identities).
"""

from __future__ import annotations

import math

import numpy as np

CI_LEVEL = 0.95
CI_METHOD = "Student t over identities (n - 1 degrees of freedom)"
RECALL_KS = (1, 5, 10)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, d] x [m, d] -> [n, m] cosines (eq. 15 for every pair)."""
    return unit(a) @ unit(b).T


def identity_cosine(generated: np.ndarray, real: np.ndarray) -> float:
    """Eq. (15) for one identity: mean over its generated faces x its real faces."""
    return float(cosine_matrix(generated, real).mean())


def centroid(real: np.ndarray) -> np.ndarray:
    """The identity's mean real-face embedding, normalised (mean of unit vectors)."""
    return unit(unit(real).mean(axis=0))


def centroid_cosine(generated: np.ndarray, real: np.ndarray) -> float:
    return float((unit(generated) @ centroid(real)).mean())


def mean_ci(values, level: float = CI_LEVEL) -> dict:
    """Mean with a Student-t confidence interval (half = t_{(1+level)/2, n-1} * s / sqrt(n)).

    t rather than normal: a split can hold a few dozen identities, where the normal interval
    is too narrow. With n < 2 there is no interval (null bounds).
    """
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def retrieval_groups(n: int, group_size: int, seed: int) -> list[np.ndarray]:
    """Per identity i, the gallery indices it competes in: i plus min(n, group_size) - 1 others
    drawn without replacement by a fixed-seed generator (everyone when n <= group_size)."""
    if n <= group_size:
        return [np.arange(n)] * n
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n):
        others = np.delete(np.arange(n), i)
        groups.append(np.concatenate([[i], rng.choice(others, group_size - 1, replace=False)]))
    return groups


def retrieval_recall(queries: list[np.ndarray], gallery: np.ndarray, ks=RECALL_KS, group_size: int = 100,
                     seed: int = 0) -> dict:
    """queries[i]: [u_i, d] generated embeddings of identity i; gallery: [n, d] one embedding
    per identity (its real-face centroid). Returns recall@k (mean over identities of the share
    of its queries whose identity ranks in the top k of its group) and the chance level."""
    n = len(queries)
    groups = retrieval_groups(n, group_size, seed)
    hits = {k: [] for k in ks}
    chance = {k: [] for k in ks}
    g = unit(gallery)
    for i, q in enumerate(queries):
        members = groups[i]
        sims = unit(q) @ g[members].T  # [u, group]
        pos = int(np.flatnonzero(members == i)[0])
        true = sims[:, pos : pos + 1]
        rank = (sims >= true).sum(axis=1) - 1  # identities at least as close, the true one excluded
        for k in ks:
            hits[k].append(float((rank < k).mean()))
            chance[k].append(min(k, len(members)) / len(members))
    return {
        "recall": {str(k): float(np.mean(hits[k])) if n else None for k in ks},
        "chance": {str(k): float(np.mean(chance[k])) if n else None for k in ks},
        "group_size": int(min(n, group_size)),
        "identities": n,
    }


def real_pair_cosines(real: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per identity: the mean cosine between its own real faces (pairs i < j; identities with
    one face give none) and the mean cosine to the faces of every other identity."""
    same, different = [], []
    all_emb = unit(np.concatenate(real))
    owner = np.repeat(np.arange(len(real)), [len(r) for r in real])
    for i, r in enumerate(real):
        c = unit(r) @ all_emb.T
        mine = owner == i
        if len(r) >= 2:
            block = c[:, mine]
            same.append(float(block[np.triu_indices(len(r), 1)].mean()))
        if (~mine).any():
            different.append(float(c[:, ~mine].mean()))
    return same, different


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney U / n_pos n_neg).

    Why beside accuracy: a probe fitted on real faces and applied to generated ones may shift
    every score to one side of its threshold (blurry faces all called one gender); its accuracy
    is then the share of that class whatever the faces show, while the AUC still says whether
    the scores rank the two classes apart (0.5: not at all)."""
    from scipy import stats

    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # From average ranks (ties share theirs), without an n_pos x n_neg comparison matrix
    u = stats.rankdata(scores)[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
