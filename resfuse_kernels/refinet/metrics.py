"""Top-k accuracy, the same for a flat classifier and for RefiNet."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_accuracy(probs: Tensor, labels: Tensor, k: int) -> float:
    """% of rows whose true class is among the ``k`` most probable.

    Ties count against: the true class's rank is the number of classes with
    a larger probability plus the other classes with an equal one. A hard
    RefiNet gives 0 to every class outside the chosen cluster, and a true
    class among those zeros must not be "in the top 5" by an arbitrary
    order of equal values.
    """
    if probs.dim() != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probs (N, C) and labels (N,) expected, got {tuple(probs.shape)} "
                         f"and {tuple(labels.shape)}")
    if not labels.numel():
        raise ValueError("accuracy of no images")
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"k must lie in [1, {probs.shape[1]}], got {k}")
    true = probs.gather(1, labels.unsqueeze(1))
    rank = (probs > true).sum(1) + (probs == true).sum(1) - 1
    return 100.0 * (rank < k).double().mean().item()
