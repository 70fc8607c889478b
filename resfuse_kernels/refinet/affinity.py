"""Class affinities from a level-1 classifier (paper section 5.1, eqs. 6 and 7).

Both take the level-1 network's outputs on N1 held-out images with known
labels and return a symmetric, non-negative C x C matrix: large where the
network moves probability between two classes, i.e. confuses them.

Eq. 6 (from scores; ``score_affinity``)::

    A_pq = (1/N1) ( sum_{i: y_i = p} score_{i,q} + sum_{i: y_i = q} score_{i,p} )

Eq. 7 (from the confusion matrix; ``confusion_affinity``)::

    A = (F + F^T) / 2,   F_pq = #{i: y_i = p, argmax_c score_{i,c} = q} / #{i: y_i = p}

The clusterings that want a distance get :func:`affinity_to_distance`.
"""

from __future__ import annotations

import numpy as np


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {scores.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must be ({scores.shape[0]},), got shape {labels.shape}")
    if scores.shape[0] == 0:
        raise ValueError("an affinity needs at least one held-out image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), "
                         f"got [{labels.min()}, {labels.max()}]")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    return scores, labels.astype(np.int64)


def score_affinity(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Eq. 6: ``A = (S + S^T) / N1`` with ``S_pq = sum_{i: y_i = p} score_{i,q}``.

    ``scores`` (N1, C): level-1 class probabilities (softmax) of held-out
    images; ``labels`` (N1,): their true classes. The diagonal is
    ``2 S_pp / N1``; clusterings ignore it or treat it as self-similarity.
    """
    scores, labels = _check_scores(scores, labels)
    c = scores.shape[1]
    s = np.zeros((c, c))
    np.add.at(s, labels, scores)
    return (s + s.T) / scores.shape[0]


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The row-normalised confusion matrix F: ``F_pq`` = share of class p's
    images predicted as q. Every class needs at least one image (a row of
    an absent class has no defined share)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions and labels must be equal-length vectors, got "
                         f"{predictions.shape} and {labels.shape}")
    for name, v in (("predictions", predictions), ("labels", labels)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (labels, predictions), 1.0)
    rows = counts.sum(1, keepdims=True)
    missing = np.flatnonzero(rows[:, 0] == 0)
    if missing.size:
        raise ValueError(f"classes {missing.tolist()} have no held-out image: their rows of "
                         f"the confusion matrix are undefined (eq. 7 needs every class)")
    return counts / rows


def confusion_affinity(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Eq. 7: ``A = (F + F^T) / 2`` from the row-normalised confusion matrix
    of the top-1 predictions ``argmax scores``."""
    scores, labels = _check_scores(scores, labels)
    f = confusion_matrix(scores.argmax(1), labels, scores.shape[1])
    return (f + f.T) / 2


AFFINITIES = {"eq6": score_affinity, "eq7": confusion_affinity}


def check_affinity(affinity: np.ndarray, k: int | None = None) -> np.ndarray:
    """``affinity`` as float64 after checking that it is a square, symmetric,
    finite, non-negative matrix (and, given ``k``, that 2 <= k <= C)."""
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"an affinity must be a square matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("the affinity contains NaN or Inf")
    if (a < 0).any():
        raise ValueError("the affinity must be non-negative")
    if not np.allclose(a, a.T, rtol=1e-10, atol=1e-12):
        raise ValueError("the affinity must be symmetric")
    if k is not None:
        if not 2 <= k <= a.shape[0]:
            raise ValueError(f"K must lie in [2, {a.shape[0]}] (the number of classes), got {k}")
    return a


def affinity_to_distance(affinity: np.ndarray) -> np.ndarray:
    """The distance used by agglomerative clustering and K-medoids::

        D_pq = 1 - A_pq / max_{r != s} A_rs   (p != q),   D_pp = 0

    Off-diagonal affinities are scaled to [0, 1] by the largest of them, so
    the most confused pair is at distance 0 and a pair never confused at 1;
    the diagonal (self-affinity) plays no part. An all-zero off-diagonal
    gives all distances 1.
    """
    a = check_affinity(affinity)
    off = a[~np.eye(a.shape[0], dtype=bool)]
    top = off.max() if off.size else 0.0
    d = 1.0 - a / top if top > 0 else np.ones_like(a)
    np.fill_diagonal(d, 0.0)
    return d
