"""The data of a RefiNet run: train, validation and test images with names.

Synthetic by default (:mod:`.synthetic`: separate seeds for the three
splits). With a Tiny-ImageNet folder: its ``train`` images, and its
official validation set split in two halves per class, alternately, into a
validation half (scores for the affinity, cluster accuracy, model choice)
and a test half, as the paper splits it (section 5.2.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..data import load_tensors, read_words
from . import synthetic

Split = tuple[Tensor, Tensor]   # uint8 images (N, 3, H, W), int64 labels (N,)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    super_classes: Optional[list[int]] = None   # the true hierarchy, when known

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_synthetic(per_class: int = 100, eval_per_class: int = 25, size: int = 32,
                   seed: int = 0) -> Dataset:
    """The shapes x stripes data: ``per_class`` training images of each of
    the 20 classes, ``eval_per_class`` in the validation and the test split."""
    return Dataset("synthetic", synthetic.make_split(per_class, size, 3 * seed + 1),
                   synthetic.make_split(eval_per_class, size, 3 * seed + 2),
                   synthetic.make_split(eval_per_class, size, 3 * seed + 3),
                   synthetic.class_names(), synthetic.super_classes())


def halves(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the two halves: each class's images alternately."""
    rank = torch.empty_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().squeeze(1)
        rank[where] = torch.arange(where.numel())
    return (rank % 2 == 0).nonzero().squeeze(1), (rank % 2 == 1).nonzero().squeeze(1)


def load_tiny_imagenet(root: str, classes: int = 100, train_limit: Optional[int] = None,
                       eval_limit: Optional[int] = None) -> Dataset:
    """A Tiny-ImageNet folder: the first ``classes`` classes; limits take
    that many images evenly over the classes (for short runs)."""
    train_x, train_y, wnids = load_tensors(root, "train", classes, train_limit)
    val_x, val_y, _ = load_tensors(root, "val", classes,
                                   None if eval_limit is None else 2 * eval_limit)
    a, b = halves(val_y)
    return Dataset(f"tiny-imagenet-{classes}", (train_x, train_y), (val_x[a], val_y[a]),
                   (val_x[b], val_y[b]), read_words(root, wnids))
