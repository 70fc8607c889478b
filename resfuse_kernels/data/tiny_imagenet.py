"""Tiny-ImageNet / TinyImageNet-100 folders, read with Pillow.

The layout (Stanford CS231n's ``tiny-imagenet-200``)::

    ROOT/wnids.txt                       one WordNet id per line: the classes
    ROOT/train/<wnid>/images/*.JPEG      the training images of each class
    ROOT/val/val_annotations.txt         "<file>\\t<wnid>\\t<x>\\t<y>\\t<w>\\t<h>" lines
    ROOT/val/images/<file>
    ROOT/words.txt                       "<wnid>\t<names>" lines (optional: class names)

The paper's ImageNet-100 is 100 of these classes (500 training images each,
50,000 in all). ``classes=N`` keeps the first N ids of ``wnids.txt`` (in
file order); labels are their indices. Images are converted to RGB and, if
they are not 64x64 already, resized to it (bilinear).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]
SIZE = 64
_EXTENSIONS = (".jpeg", ".jpg", ".png")


def read_wnids(root: PathLike, classes: Optional[int] = None) -> list[str]:
    """The class ids of ``root/wnids.txt``, the first ``classes`` of them."""
    path = Path(root) / "wnids.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a Tiny-ImageNet folder?")
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if classes is not None:
        if classes > len(wnids):
            raise ValueError(f"{path} lists {len(wnids)} classes, {classes} asked for")
        wnids = wnids[:classes]
    return wnids


def read_words(root: PathLike, wnids: list[str]) -> list[str]:
    """A readable name for each of ``wnids``: the first synonym of its line
    in ``root/words.txt`` ("n01443537<TAB>goldfish, Carassius auratus" ->
    "goldfish"); the wnid itself where words.txt or its line is absent."""
    path = Path(root) / "words.txt"
    words: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            wnid, _, names = line.partition("\t")
            if names.strip():
                words[wnid.strip()] = names.split(",")[0].strip()
    return [words.get(w, w) for w in wnids]


def list_images(root: PathLike, split: str = "train",
                classes: Optional[int] = None) -> tuple[list[Path], list[int], list[str]]:
    """``(files, labels, wnids)`` of ``split`` ("train" or "val"), in a fixed order."""
    root = Path(root)
    wnids = read_wnids(root, classes)
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for label, wnid in enumerate(wnids):
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} not found")
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in _EXTENSIONS:
                    files.append(f)
                    labels.append(label)
    elif split == "val":
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise FileNotFoundError(f"{annotations} not found")
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                continue
            files.append(root / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return files, labels, wnids


def load_image(path: PathLike) -> Tensor:
    """One image as a uint8 tensor (3, 64, 64)."""
    from PIL import Image  # Pillow: the ``bench`` extra

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.BILINEAR)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(SIZE, SIZE, 3).permute(2, 0, 1).contiguous()


def load_tensors(root: PathLike, split: str = "train", classes: Optional[int] = 100,
                 limit: Optional[int] = None) -> tuple[Tensor, Tensor, list[str]]:
    """``(images uint8 (N, 3, 64, 64), labels int64 (N,), wnids)``.

    ``limit`` reads only the first ``limit`` images, taken evenly across the
    classes (round-robin), so a short benchmark still sees every class.
    """
    files, labels, wnids = list_images(root, split, classes)
    if not files:
        raise ValueError(f"no images in {root} ({split})")
    if limit is not None and limit < len(files):
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            by_class.setdefault(label, []).append(i)
        order: list[int] = []
        queues = [by_class[k] for k in sorted(by_class)]
        depth = 0
        while len(order) < limit:
            for q in queues:
                if depth < len(q) and len(order) < limit:
                    order.append(q[depth])
            depth += 1
        files = [files[i] for i in order]
        labels = [labels[i] for i in order]
    images = torch.empty(len(files), 3, SIZE, SIZE, dtype=torch.uint8)
    for i, f in enumerate(files):
        images[i] = load_image(f)
    return images, torch.tensor(labels, dtype=torch.int64), wnids


class TinyImageNet(torch.utils.data.Dataset):
    """A map-style dataset of ``(uint8 image (3, 64, 64), label)``, read lazily."""

    def __init__(self, root: PathLike, split: str = "train",
                 classes: Optional[int] = 100) -> None:
        self.files, self.labels, self.wnids = list_images(root, split, classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return load_image(self.files[i]), self.labels[i]


# ImageNet's channel statistics, for the uint8 -> float conversion.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (N, 3, H, W) -> ``dtype``, scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    return (images.to(dtype) / 255 - mean) / std
