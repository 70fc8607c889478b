"""K-medoids in NumPy: exhaustive when small, PAM (BUILD + SWAP) otherwise.

scikit-learn has no K-medoids, the ``kmedoids`` package is GPL-3 and
scikit-learn-extra does not import with numpy 2, so this small version is
ours. It minimises the total cost ``sum_i min_m D[i, m]`` over medoid sets.
When there are at most ``exact_limit`` sets (``comb(C, k)``: 20 classes in 4
clusters are 4,845) it tries them all and returns the optimum. Otherwise
Kaufman & Rousseeuw's PAM, deterministic (no seed): BUILD picks medoids
greedily, then SWAP makes the best single medoid <-> non-medoid exchange
while it lowers the cost. PAM stops at a swap-optimal set, usually but not
always the optimum. Cost per SWAP pass: O(k C^2), plenty for C in the
hundreds (class labels).
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def _cost(d: np.ndarray, medoids: list[int]) -> float:
    return float(d[:, medoids].min(1).sum())


def _exact(d: np.ndarray, k: int) -> list[int]:
    best, best_cost = None, np.inf
    for medoids in itertools.combinations(range(d.shape[0]), k):
        cost = d[:, medoids].min(1).sum()
        if cost < best_cost:
            best, best_cost = list(medoids), cost
    return best


def kmedoids(distance: np.ndarray, k: int, exact_limit: int = 10_000,
             max_swaps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, medoids)`` of K-medoids on a precomputed distance
    (exhaustive if ``comb(C, k) <= exact_limit``, else PAM).

    ``distance`` (C, C): symmetric, zero diagonal. Each point joins its
    nearest medoid (the lowest medoid index on ties); ``labels[m]`` of a
    medoid m is its own cluster. ``medoids`` is sorted; cluster j is the one
    of ``medoids[j]``.
    """
    d = np.asarray(distance, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"a distance must be a square matrix, got shape {d.shape}")
    n = d.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    if not np.isfinite(d).all() or (d < 0).any():
        raise ValueError("distances must be finite and non-negative")
    medoids = _exact(d, k) if math.comb(n, k) <= exact_limit else _pam(d, k, max_swaps)
    medoids_arr = np.array(sorted(medoids))
    labels = d[:, medoids_arr].argmin(1)
    labels[medoids_arr] = np.arange(k)   # a medoid at distance 0 from another stays its own
    return labels, medoids_arr


def _pam(d: np.ndarray, k: int, max_swaps: int) -> list[int]:
    n = d.shape[0]
    # BUILD: the most central point, then the point that lowers the cost most.
    medoids = [int(d.sum(1).argmin())]
    nearest = d[:, medoids[0]].copy()
    while len(medoids) < k:
        gain = np.maximum(nearest[:, None] - d, 0.0).sum(0)   # gain of adding column j
        gain[medoids] = -1.0
        j = int(gain.argmax())
        medoids.append(j)
        nearest = np.minimum(nearest, d[:, j])
    # SWAP: the best exchange over all (medoid, non-medoid) pairs, while it helps.
    cost = _cost(d, medoids)
    for _ in range(max_swaps):
        best = (cost, -1, -1)
        others = np.setdiff1d(np.arange(n), medoids)
        for slot in range(k):
            rest = medoids[:slot] + medoids[slot + 1:]
            base = d[:, rest].min(1) if rest else np.full(n, np.inf)
            costs = np.minimum(base[:, None], d[:, others]).sum(0)
            j = int(costs.argmin())
            # Strictly lower by more than rounding, so that SWAP cannot cycle.
            if costs[j] < best[0] - 1e-12 * max(1.0, abs(best[0])):
                best = (float(costs[j]), slot, int(others[j]))
        if best[1] < 0:
            break
        medoids[best[1]] = best[2]
        cost = best[0]
    else:
        raise RuntimeError(f"PAM did not settle in {max_swaps} swaps")
    return medoids
