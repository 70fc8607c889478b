"""Synthetic images with a known label hierarchy, for tests and the default run.

20 classes = 4 shapes (disc, square, triangle, cross) x 5 stripe
orientations (0, 36, 72, 108, 144 degrees). The shape is large and in full
contrast; the stripes filling it are faint (amplitude ``contrast`` of the
colour, below the pixel noise). A small CNN learns the shapes within an
epoch or two and confuses the orientations of a shape among themselves, so
the level-1 confusions have the 4 shapes as their clusters: the ground
truth that :func:`super_classes` returns. A network that sees only one
shape's images (a level-2 head) learns the orientations. Each image also gets a random
position, scale, colour, stripe phase and pixel noise.

Deterministic: a split is a function of its seed alone (a torch Generator).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SHAPES = ("disc", "square", "triangle", "cross")
ORIENTATIONS = (0, 36, 72, 108, 144)
NUM_CLASSES = len(SHAPES) * len(ORIENTATIONS)


def class_names() -> list[str]:
    """``shape/angle`` of each class; class ``c`` is shape ``c // 5``, angle ``c % 5``."""
    return [f"{s}/{a}deg" for s in SHAPES for a in ORIENTATIONS]


def super_classes() -> list[int]:
    """(C,) the true super-class (the shape) of each class."""
    return [c // len(ORIENTATIONS) for c in range(NUM_CLASSES)]


def _masks(kind: Tensor, x: Tensor, y: Tensor, s: Tensor) -> Tensor:
    """Boolean (N, H, W) shape masks; x, y centred coordinates, s the size."""
    ax, ay = x.abs(), y.abs()
    disc = x ** 2 + y ** 2 < s ** 2
    square = torch.maximum(ax, ay) < 0.85 * s
    # Apex up: the half-width shrinks linearly from s at the base to 0 at the apex.
    v = (y + 0.8 * s) / (1.6 * s)
    triangle = (v > 0) & (v < 1) & (ax < s * v)
    cross = ((ax < 0.3 * s) & (ay < s)) | ((ay < 0.3 * s) & (ax < s))
    options = torch.stack([disc, square, triangle, cross])            # (4, N, H, W)
    return options.gather(0, kind.view(1, -1, 1, 1).expand(1, *disc.shape))[0]


def make_images(labels: Tensor, size: int = 32, seed: int = 0, contrast: float = 0.1,
                noise: float = 0.15) -> Tensor:
    """uint8 (N, 3, size, size) images of the classes ``labels``."""
    if labels.dim() != 1 or (labels < 0).any() or (labels >= NUM_CLASSES).any():
        raise ValueError(f"labels must be a vector of classes in [0, {NUM_CLASSES})")
    g = torch.Generator().manual_seed(seed)
    n = labels.numel()

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    cx, cy = uniform(-0.2, 0.2, 1, 1), uniform(-0.2, 0.2, 1, 1)
    x, y = xx - cx, yy - cy
    s = uniform(0.5, 0.75, 1, 1)
    mask = _masks(labels // len(ORIENTATIONS), x, y, s)
    theta = torch.tensor(ORIENTATIONS, dtype=torch.float32)[labels % len(ORIENTATIONS)]
    theta = (theta * math.pi / 180).view(n, 1, 1)
    period = size / 5 / (size / 2)                       # 5 stripes across the image
    phase = uniform(0, 2 * math.pi, 1, 1)
    stripes = torch.sin(2 * math.pi * (x * torch.cos(theta) + y * torch.sin(theta)) / period
                        + phase)
    background = uniform(0.0, 0.35, 3, 1, 1)
    colour = uniform(0.55, 1.0, 3, 1, 1)
    foreground = colour * (1 + contrast * stripes).unsqueeze(1) / (1 + contrast)
    image = torch.where(mask.unsqueeze(1), foreground, background)
    image = image + noise * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def make_split(per_class: int, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(images, labels)``: ``per_class`` images of every class, classes interleaved."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    labels = torch.arange(NUM_CLASSES).repeat(per_class)
    return make_images(labels, size, seed), labels
