"""The label hierarchy: a tree over the class labels (sections 5.1, 5.2.2, 6.2).

A tree is a nested list: a leaf is a list of class ids, an inner node a list
of at least two nodes. ``[[0, 1], [[2, 3], [4]]]`` has leaves {0, 1}, {2, 3}
and {4}; the second top-level cluster was split again. RefiNet-L2 is a flat
tree (K leaves), RefiNet-L3 splits its largest cluster once more
(:func:`split_largest`), and the paper's proposal for many classes splits the
largest cluster until every cluster has at most a given size
(:func:`split_until`). Each leaf gets its own level-2 (or level-3) network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .clustering import cluster


def _leaves(node: Any) -> list[tuple[int, ...]]:
    if all(isinstance(x, (int, np.integer)) for x in node):
        return [tuple(int(x) for x in node)]
    return [leaf for child in node for leaf in _leaves(child)]


def node_classes(node: Any) -> list[int]:
    """Every class under ``node`` (a leaf or an inner node), depth first."""
    return [c for leaf in _leaves(node) for c in leaf]


def _check_node(node: Any) -> None:
    if not isinstance(node, (list, tuple)) or not node:
        raise ValueError(f"a tree node must be a non-empty list, got {node!r}")
    kinds = {isinstance(x, (int, np.integer)) for x in node}
    if len(kinds) != 1:
        raise ValueError(f"a node holds either class ids or child nodes, not both: {node!r}")
    if kinds == {False}:
        if len(node) < 2:
            raise ValueError(f"an inner node needs at least two children: {node!r}")
        for child in node:
            _check_node(child)


def _freeze(node: Any) -> tuple:
    if isinstance(node, (int, np.integer)):
        return int(node)
    return tuple(_freeze(x) for x in node)


@dataclass(frozen=True)
class Hierarchy:
    """A tree over the classes 0..C-1; every class in exactly one leaf."""

    tree: tuple

    def __post_init__(self) -> None:
        _check_node(self.tree)
        object.__setattr__(self, "tree", _freeze(self.tree))
        if isinstance(self.tree[0], int):
            raise ValueError("the root must be an inner node (at least two clusters)")
        classes = sorted(c for leaf in self.leaves for c in leaf)
        if classes != list(range(len(classes))):
            raise ValueError("the leaves must hold each class 0..C-1 exactly once")

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> "Hierarchy":
        """The flat tree of a clustering: leaf j holds the classes labelled j."""
        labels = np.asarray(labels)
        return cls(tuple(tuple(np.flatnonzero(labels == j).tolist())
                         for j in range(int(labels.max()) + 1)))

    @property
    def leaves(self) -> list[tuple[int, ...]]:
        """The leaves' classes, depth first; leaf i is cluster i."""
        return _leaves(self.tree)

    @property
    def num_classes(self) -> int:
        return sum(len(leaf) for leaf in self.leaves)

    @property
    def depth(self) -> int:
        """Levels of clusters: 1 for a flat tree (RefiNet-L2), 2 for L3, ..."""
        def walk(node: Any) -> int:
            return 0 if isinstance(node[0], int) else 1 + max(walk(c) for c in node)
        return walk(self.tree)

    def class_to_leaf(self) -> np.ndarray:
        """(C,) the leaf of each class."""
        out = np.empty(self.num_classes, dtype=np.int64)
        for i, leaf in enumerate(self.leaves):
            out[list(leaf)] = i
        return out

    def to_json(self) -> str:
        return json.dumps(self.tree)

    @classmethod
    def from_json(cls, text: str) -> "Hierarchy":
        return cls(json.loads(text))

    def split_leaf(self, index: int, labels: np.ndarray) -> "Hierarchy":
        """The tree with leaf ``index`` replaced by an inner node whose
        children are the groups of ``labels`` (one label per class of the
        leaf, in the leaf's order)."""
        leaf = self.leaves[index]
        labels = np.asarray(labels)
        if labels.shape != (len(leaf),):
            raise ValueError(f"leaf {index} has {len(leaf)} classes, got {labels.shape} labels")
        children = tuple(tuple(leaf[i] for i in np.flatnonzero(labels == j))
                         for j in range(int(labels.max()) + 1))
        counter = iter(range(len(self.leaves)))

        def replace(node: Any) -> Any:
            if isinstance(node[0], int):
                return children if next(counter) == index else node
            return tuple(replace(c) for c in node)
        return Hierarchy(replace(self.tree))


def largest_leaf(hierarchy: Hierarchy) -> int:
    """The index of the largest leaf (the first of equal ones)."""
    sizes = [len(leaf) for leaf in hierarchy.leaves]
    return sizes.index(max(sizes))


def split_largest(hierarchy: Hierarchy, affinity: np.ndarray, method: str = "spectral",
                  parts: int = 2, **options: Any) -> Hierarchy:
    """RefiNet-L3's step: cluster the largest leaf's classes into ``parts``
    clusters on their own sub-affinity ``A[leaf][:, leaf]``."""
    index = largest_leaf(hierarchy)
    leaf = list(hierarchy.leaves[index])
    if len(leaf) < parts:
        raise ValueError(f"the largest cluster has {len(leaf)} classes: too few to split "
                         f"into {parts}")
    sub = np.asarray(affinity)[np.ix_(leaf, leaf)]
    return hierarchy.split_leaf(index, cluster(sub, parts, method, **options))


def split_until(hierarchy: Hierarchy, affinity: np.ndarray, max_size: int,
                method: str = "spectral", **options: Any) -> Hierarchy:
    """Section 6.2's rule: split the largest cluster in two, again and again,
    until every cluster has at most ``max_size`` classes."""
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    while max(len(leaf) for leaf in hierarchy.leaves) > max_size:
        hierarchy = split_largest(hierarchy, affinity, method, 2, **options)
    return hierarchy
