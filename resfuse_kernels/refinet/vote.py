"""From level-1 class probabilities to clusters: the top-5 vote (section 5.1).

The paper's aggregation layer: "the top 5 predicted class labels each maps to
a corresponding cluster, we count the number of votes each cluster has among
the top 5 predictions and assign the cluster label with most votes". It
gives no tie-break, and ties are common (2-2-1 among five votes). Ours:
among the clusters with the most votes, the one with the larger **cluster
mass**, the summed level-1 probability of all its classes (the soft
variant's cluster probability, :func:`cluster_mass`); the lowest index only
if the masses are exactly equal. Mass carries the voters' confidence and the
rest of the distribution, where the lowest index would carry nothing.

In a deeper tree each inner node votes among its children with the top 5
of its own classes: an image descends from the root to a leaf (:func:`route`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .hierarchy import Hierarchy, node_classes

TOP = 5


def _check_probs(probs: Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probabilities must be (N, C), got shape {tuple(probs.shape)}")
    if probs.numel() and (probs.min() < 0 or (probs.sum(1) > 1 + 1e-3).any()):
        raise ValueError("expected class probabilities (non-negative, rows summing to at "
                         "most 1): apply softmax to logits first")


def _membership(groups: Sequence[Sequence[int]], num_classes: int, probs: Tensor) -> Tensor:
    """(C, G) one-hot membership of each class in its group."""
    m = torch.zeros(num_classes, len(groups), dtype=probs.dtype, device=probs.device)
    for g, classes in enumerate(groups):
        m[list(classes), g] = 1
    return m


def cluster_mass(probs: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """(N, G): the summed probability of each group's classes."""
    _check_probs(probs)
    return probs @ _membership(groups, probs.shape[1], probs)


def vote(probs: Tensor, groups: Sequence[Sequence[int]], top: int = TOP) -> Tensor:
    """(N,) the winning group of each row: the ``top`` most probable classes
    among those of ``groups`` vote for their group; ties go to the larger
    :func:`cluster_mass`, then to the lower index. Classes outside every
    group take no part."""
    _check_probs(probs)
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    classes = [c for g in groups for c in g]
    if len(set(classes)) != len(classes):
        raise ValueError("a class belongs to two groups")
    group_of = torch.tensor([g for g, cs in enumerate(groups) for _ in cs], device=probs.device)
    sub = probs[:, classes].double()
    voters = sub.topk(min(top, len(classes)), dim=1).indices
    votes = torch.nn.functional.one_hot(group_of[voters], len(groups)).sum(1).double()
    mass = cluster_mass(probs.double(), groups)
    # Votes are integers and 0 <= mass <= 1, so half the mass orders only equal votes.
    return (votes + 0.5 * mass).argmax(1)


def route(probs: Tensor, hierarchy: Hierarchy, top: int = TOP) -> Tensor:
    """(N,) each image's leaf: from the root, every inner node's
    :func:`vote` among its children sends the image one level down."""
    if probs.shape[1] != hierarchy.num_classes:
        raise ValueError(f"probabilities over {probs.shape[1]} classes for a hierarchy of "
                         f"{hierarchy.num_classes}")
    leaf_ids = {leaf: i for i, leaf in enumerate(hierarchy.leaves)}
    out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)

    def descend(node: tuple, rows: Tensor) -> None:
        if isinstance(node[0], int):
            out[rows] = leaf_ids[node]
            return
        choice = vote(probs[rows], [node_classes(child) for child in node], top)
        for g, child in enumerate(node):
            picked = rows[choice == g]
            if picked.numel():
                descend(child, picked)

    descend(hierarchy.tree, torch.arange(probs.shape[0], device=probs.device))
    return out


def cluster_accuracy(predicted: Tensor, labels: Tensor, hierarchy: Hierarchy) -> float:
    """Cluster accuracy in %: the share of images whose true class's leaf is
    the predicted leaf (section 5.2.2)."""
    if predicted.shape != labels.shape:
        raise ValueError(f"{tuple(predicted.shape)} predictions for {tuple(labels.shape)} labels")
    if not labels.numel():
        raise ValueError("cluster accuracy of no images")
    truth = torch.as_tensor(hierarchy.class_to_leaf(), device=labels.device)[labels]
    return 100.0 * (truth == predicted).double().mean().item()
