"""Clustering the C class labels into K clusters on a class affinity (section 5.2.2).

Four methods, every one on the same precomputed C x C affinity A (eq. 6 or
7; :mod:`.affinity`):

* ``spectral``: scikit-learn's SpectralClustering with
  ``affinity='precomputed'`` on A; ``assign_labels`` picks how labels are
  read from the spectral embedding: ``'kmeans'`` (the paper's "followed by a
  K-Means in the low dimensional space"), ``'discretize'`` or ``'cluster_qr'``.
* ``agglomerative``: scikit-learn's AgglomerativeClustering with
  ``metric='precomputed'`` on the distance D of
  :func:`~.affinity.affinity_to_distance`, ``linkage`` average (default),
  complete or single (ward needs Euclidean features, not a distance).
* ``affinity_propagation``: scikit-learn's AffinityPropagation with
  ``affinity='precomputed'`` on A (similarities). AP picks the number of
  clusters itself, from the preference (the diagonal of the similarity):
  :func:`affinity_propagation` bisects the preference until AP gives exactly
  K clusters and raises :class:`KNotReached` when no preference it tries
  does (the count jumps over K, or AP does not converge).
* ``kmedoids``: PAM (:mod:`.kmedoids`) on D.

Labels are canonical: clusters are numbered in the order of their smallest
class index, so the same partition always has the same labels.
"""

from __future__ import annotations

import warnings

import numpy as np

from .affinity import affinity_to_distance, check_affinity
from .kmedoids import kmedoids

METHODS = ("spectral", "agglomerative", "affinity_propagation", "kmedoids")
ASSIGN_LABELS = ("kmeans", "discretize", "cluster_qr")
LINKAGES = ("average", "complete", "single")


class KNotReached(ValueError):
    """Affinity propagation gave no preference that yields exactly K clusters."""


def canonical(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 0, 1, ... in the order of each cluster's first class."""
    labels = np.asarray(labels)
    order = {}
    for value in labels.tolist():
        order.setdefault(value, len(order))
    return np.array([order[v] for v in labels.tolist()], dtype=np.int64)


def spectral(affinity: np.ndarray, k: int, seed: int = 0,
             assign_labels: str = "kmeans") -> np.ndarray:
    """Spectral clustering of the precomputed affinity into ``k`` clusters."""
    from sklearn.cluster import SpectralClustering

    if assign_labels not in ASSIGN_LABELS:
        raise ValueError(f"assign_labels must be one of {ASSIGN_LABELS}, got {assign_labels!r}")
    a = check_affinity(affinity, k)
    model = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels=assign_labels,
                               random_state=seed, n_init=10)
    with warnings.catch_warnings():
        # On a few classes ARPACK cannot run and scikit-learn says so before
        # taking the dense eigensolver, which is the right one there.
        warnings.filterwarnings("ignore", message="k >= N", category=RuntimeWarning)
        return canonical(model.fit_predict(a))


def agglomerative(affinity: np.ndarray, k: int, linkage: str = "average") -> np.ndarray:
    """Agglomerative clustering of the distance ``1 - A / max A`` into ``k`` clusters."""
    from sklearn.cluster import AgglomerativeClustering

    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES} on a precomputed distance, "
                         f"got {linkage!r}")
    d = affinity_to_distance(check_affinity(affinity, k))
    model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
    return canonical(model.fit_predict(d))


def _ap_count(a: np.ndarray, preference: float, seed: int) -> tuple[int, np.ndarray | None]:
    """AP's number of clusters at ``preference`` (0 when it did not converge)."""
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    model = AffinityPropagation(affinity="precomputed", preference=preference, damping=0.9,
                                max_iter=2000, convergence_iter=50, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = model.fit_predict(a)
    if labels.min() < 0:
        return 0, None
    return int(labels.max()) + 1, labels


def _ap_interval(a: np.ndarray) -> tuple[float, float]:
    """The preferences the search starts between (see :func:`affinity_propagation`)."""
    c = a.shape[0]
    off = a[~np.eye(c, dtype=bool)]
    spread = max(float(off.max() - off.min()), 1e-12)
    return float(off.min()) - c * spread, float(off.max()) + spread


def affinity_propagation(affinity: np.ndarray, k: int, seed: int = 0,
                         steps: int = 60) -> np.ndarray:
    """Affinity propagation with its preference bisected to give ``k`` clusters.

    The number of clusters grows with the preference p. The search starts
    from ``p_lo = min A - C (max A - min A)`` (one cluster or close) and
    ``p_hi = max A + (max A - min A)`` (every class its own exemplar) over
    the off-diagonal entries and bisects for ``steps`` steps, moving up when
    AP gives fewer than k clusters and down when more. A run that does not
    converge moves the search down (lower preferences damp oscillation).
    Raises :class:`KNotReached`, listing the counts it saw, when no step
    gives exactly k.
    """
    a = check_affinity(affinity, k)
    lo, hi = _ap_interval(a)
    seen: dict[int, float] = {}
    for _ in range(steps):
        p = (lo + hi) / 2
        count, labels = _ap_count(a, p, seed)
        seen.setdefault(count, p)
        if count == k:
            return canonical(labels)
        if 0 < count < k:
            lo = p
        else:
            hi = p
    counts = ", ".join(f"{n} at preference {p:.4g}" if n else f"no convergence at {p:.4g}"
                       for n, p in sorted(seen.items()))
    raise KNotReached(f"affinity propagation gave no preference with exactly {k} clusters in "
                      f"{steps} bisection steps (saw: {counts})")


def k_medoids(affinity: np.ndarray, k: int) -> np.ndarray:
    """PAM K-medoids (:mod:`.kmedoids`) on the distance ``1 - A / max A``."""
    d = affinity_to_distance(check_affinity(affinity, k))
    return canonical(kmedoids(d, k)[0])


def cluster(affinity: np.ndarray, k: int, method: str = "spectral", seed: int = 0,
            assign_labels: str = "kmeans", linkage: str = "average") -> np.ndarray:
    """Canonical cluster labels (C,) of the classes, by ``method`` (one of :data:`METHODS`)."""
    if method == "spectral":
        labels = spectral(affinity, k, seed, assign_labels)
    elif method == "agglomerative":
        labels = agglomerative(affinity, k, linkage)
    elif method == "affinity_propagation":
        labels = affinity_propagation(affinity, k, seed)
    elif method == "kmedoids":
        labels = k_medoids(affinity, k)
    else:
        raise ValueError(f"unknown clustering method {method!r}; "
                         f"choose one of {', '.join(METHODS)}")
    if labels.max() + 1 != k:
        raise RuntimeError(f"{method} gave {labels.max() + 1} clusters, {k} asked for")
    return labels
