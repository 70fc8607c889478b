"""Learnable synthetic images: a stand-in for Tiny-ImageNet with no download.

Each class ``c`` owns a fixed random low-frequency colour pattern: a
``3 x 4 x 4`` standard-normal grid, upsampled bilinearly to the image size.
Image ``i`` has label ``i % classes`` (balanced classes) and is its class's
pattern plus independent per-pixel Gaussian noise of the same strength,
stored as uint8 like a decoded JPEG::

    image = clamp(128 + 48 * pattern[label] + 48 * noise, 0, 255)

A class is therefore recognisable from the image (a net learns it in a few
hundred steps) but no single pixel gives it away. Everything derives from
``seed``: the patterns from ``seed`` alone (shared by every split), image
``i``'s noise from ``(seed, split, i)``, so the same arguments give the same
images in any process, worker or order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SPLITS = ("train", "val")
_LEVEL, _AMPLITUDE, _GRID = 128.0, 48.0, 4


def class_patterns(classes: int, image_size: int, seed: int) -> Tensor:
    """The ``(classes, 3, image_size, image_size)`` float patterns of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(classes, 3, _GRID, _GRID, generator=g)
    return F.interpolate(grid, size=(image_size, image_size), mode="bilinear",
                         align_corners=False)


class SyntheticImages(torch.utils.data.Dataset):
    """``size`` images ``(uint8 (3, image_size, image_size), label)`` of ``classes``
    classes (see the module docstring); ``split`` picks an independent set of
    images of the same classes."""

    def __init__(self, size: int, classes: int = 100, image_size: int = 64, seed: int = 0,
                 split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 1 or classes < 2 or image_size < 1:
            raise ValueError(f"need size >= 1, classes >= 2, image_size >= 1; got {size}, "
                             f"{classes}, {image_size}")
        self.size, self.classes, self.image_size = size, classes, image_size
        self.seed, self.split = seed, split
        self.patterns = class_patterns(classes, image_size, seed)
        self.labels = [i % classes for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} images")
        label = self.labels[i]
        stream = (self.seed * len(SPLITS) + SPLITS.index(self.split)) * 2 ** 32 + i
        g = torch.Generator().manual_seed(stream % 2 ** 63)
        noise = torch.randn(self.patterns.shape[1:], generator=g)
        image = _LEVEL + _AMPLITUDE * (self.patterns[label] + noise)
        return image.round_().clamp_(0, 255).to(torch.uint8), label
