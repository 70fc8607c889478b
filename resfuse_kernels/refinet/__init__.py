"""RefiNet (paper section 5): a label hierarchy learned from a level-1
classifier's confusions, and level-2 networks per cluster of classes.

    from resfuse_kernels import refinet
    a = refinet.score_affinity(probs, labels)             # eq. 6 (eq. 7: confusion_affinity)
    h = refinet.Hierarchy.from_labels(refinet.cluster(a, k=5, method="spectral"))
    leaf = refinet.route(probs, h)                       # the top-5 vote (refinet.vote)
    model = refinet.RefiNet(spec, level1, h, heads)      # forward: (N, C) probabilities

``python -m resfuse_kernels.refinet`` runs the whole pipeline (docs/refinet.md).
"""

from .affinity import (affinity_to_distance, confusion_affinity, confusion_matrix,
                       score_affinity)
from .clustering import METHODS, KNotReached, cluster
from .hierarchy import Hierarchy, split_largest, split_until
from .metrics import topk_accuracy
from .model import Level1Spec, RefiNet, soft_weights
from .vgg import load_weights, vgg16
from .vote import cluster_accuracy, cluster_mass, route

__all__ = ["Hierarchy", "KNotReached", "Level1Spec", "METHODS", "RefiNet", "affinity_to_distance",
           "cluster", "cluster_accuracy", "cluster_mass", "confusion_affinity",
           "confusion_matrix", "load_weights", "route", "score_affinity", "soft_weights",
           "split_largest", "split_until", "topk_accuracy", "vgg16"]
