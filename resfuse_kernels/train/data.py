"""The trainer's data: datasets, the validation/test split, seeded batches.

* Training images: a Tiny-ImageNet folder's ``train`` split
  (:class:`~resfuse_kernels.data.TinyImageNet`) or
  :class:`~resfuse_kernels.data.SyntheticImages`.
* Held-out images: the folder's official ``val`` split (or a synthetic one),
  divided as the paper does into a validation half (every epoch) and a test
  half (once, at the end): per class, a seeded shuffle, the first half to
  validation. The split is written into the run folder (``split.json``).
* Order: :class:`EpochSampler`. Each epoch is a seeded permutation cut into
  global batches; each rank takes its slice of every global batch. So the
  sequence of global batches depends on the seed and the epoch only, not on
  the number of processes, any RNG stream, or where a run was resumed.
* Augmentation (random crop of the zero-padded image, horizontal flip) draws
  from a per-sample seed that the sampler hands out with the index, so it
  is the same with any number of DataLoader workers and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import SyntheticImages, TinyImageNet, normalize
from .config import TrainConfig

Token = Union[int, tuple[int, int]]


def _generator(*parts: int) -> torch.Generator:
    """A generator seeded by ``parts`` (e.g. seed, epoch), independent of any global RNG."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % 2 ** 63
    return torch.Generator().manual_seed(value)


def split_holdout(labels: list[int], seed: int) -> tuple[list[int], list[int]]:
    """``(validation, test)`` indices: each class's held-out images shuffled
    with ``seed``, the first half (rounded up) for validation, the rest for test."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    g = _generator(seed)
    val, test = [], []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=g).tolist()
        half = (len(members) + 1) // 2
        val += [members[j] for j in order[:half]]
        test += [members[j] for j in order[half:]]
    return sorted(val), sorted(test)


def augment(image: Tensor, seed: int, padding: int) -> Tensor:
    """A random ``padding``-pixel-shifted crop of the zero-padded ``image``
    (C, H, W), flipped left-right with probability 1/2, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    dy, dx = torch.randint(0, 2 * padding + 1, (2,), generator=g).tolist()
    flip = torch.randint(0, 2, (), generator=g).item()
    if padding:
        h, w = image.shape[-2:]
        image = F.pad(image, (padding, padding, padding, padding))[:, dy:dy + h, dx:dx + w]
    return image.flip(-1) if flip else image


class Transformed(Dataset):
    """``dataset``'s ``(uint8 image, label)`` pairs; an ``(index, seed)`` token
    gets the augmentation of ``seed``, a plain index none."""

    def __init__(self, dataset: Dataset, padding: int, enabled: bool) -> None:
        self.dataset, self.padding, self.enabled = dataset, padding, enabled

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, token: Token) -> tuple[Tensor, int]:
        index, seed = token if isinstance(token, tuple) else (token, None)
        image, label = self.dataset[index]
        if self.enabled and seed is not None:
            image = augment(image, seed, self.padding)
        return image.contiguous(), label


class EpochSampler(torch.utils.data.Sampler):
    """Yields this rank's ``(index, augmentation seed)`` tokens of one epoch.

    Epoch ``e`` is the permutation of ``_generator(seed, e)``, cut into
    ``steps_per_epoch`` global batches of ``global_batch`` (the remainder is
    dropped, so that every step has a full batch on every rank); rank ``r``
    takes the ``r``-th of ``world`` equal slices of each. :meth:`set_epoch`
    picks the epoch and the step to start from (a resumed epoch).
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0,
                 world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(f"the batch {global_batch} does not split evenly over {world} "
                             f"processes: pass a multiple of {world}")
        if size < global_batch:
            raise ValueError(f"{size} training images do not make one batch of {global_batch}")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world = rank, world
        self.local_batch = global_batch // world
        self.steps_per_epoch = size // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its step ``start_step``."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = _generator(self.seed, self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        seeds = torch.randint(0, 2 ** 62, (self.size,), generator=g).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * self.local_batch
            for position in range(first, first + self.local_batch):
                yield order[position], seeds[position]


@dataclass
class Data:
    """The loaders of a run and what is recorded about its data."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    sampler: EpochSampler
    source: str
    classes: int
    image_size: int
    split: dict
    sizes: dict


def _datasets(config: TrainConfig) -> tuple[Dataset, Dataset, list[int], Optional[list[str]],
                                            str, int]:
    """``(train, held-out, held-out labels, held-out file names, source, image size)``."""
    if config.data is None:
        c = config
        train = SyntheticImages(c.synthetic_train, c.classes, c.image_size, c.seed, "train")
        held = SyntheticImages(c.synthetic_val, c.classes, c.image_size, c.seed, "val")
        source = (f"synthetic ({c.synthetic_train} train + {c.synthetic_val} held-out images, "
                  f"{c.classes} classes, {c.image_size}x{c.image_size}, seed {c.seed})")
        return train, held, held.labels, None, source, c.image_size
    train = TinyImageNet(config.data, "train", config.classes)
    held = TinyImageNet(config.data, "val", config.classes)
    if not len(train) or not len(held):
        raise ValueError(f"{config.data}: no images in its train or val split for "
                         f"{config.classes} classes")
    source = (f"{config.data} ({len(train)} train + {len(held)} val images, "
              f"{config.classes} classes)")
    return train, held, held.labels, [f.name for f in held.files], source, 64


def build(config: TrainConfig, rank: int = 0, world: int = 1, workers: int = 0,
          pin_memory: bool = False) -> Data:
    """The training loader (this rank's slice of each global batch) and the
    validation and test loaders (this rank's contiguous share, unpadded, so
    count-weighted sums over the ranks cover each image once)."""
    train, held, labels, files, source, size = _datasets(config)
    val_idx, test_idx = split_holdout(labels, config.split_seed)
    sampler = EpochSampler(len(train), config.batch, config.seed, rank, world)
    # Own generators: creating a loader's iterator then draws nothing from the
    # global RNG, whose state a checkpoint restores.
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                  generator=_generator(config.seed, -1))
    train_loader = DataLoader(Transformed(train, config.crop_padding, config.augment),
                              batch_size=sampler.local_batch, sampler=sampler, **common)

    def shard(indices: list[int]) -> DataLoader:
        lo, hi = len(indices) * rank // world, len(indices) * (rank + 1) // world
        return DataLoader(Subset(Transformed(held, 0, False), indices[lo:hi]),
                          batch_size=config.eval_batch or config.batch, shuffle=False, **common)

    split = {"seed": config.split_seed, "rule": "per class: seeded shuffle, first half "
             "(rounded up) validation, the rest test", "val": val_idx, "test": test_idx}
    if files is not None:
        split["val_files"] = [files[i] for i in val_idx]
        split["test_files"] = [files[i] for i in test_idx]
    sizes = {"train": len(train), "val": len(val_idx), "test": len(test_idx),
             "steps_per_epoch": sampler.steps_per_epoch,
             "train_images_per_epoch": sampler.steps_per_epoch * config.batch}
    return Data(train_loader, shard(val_idx), shard(test_idx), sampler, source,
                config.classes, size, split, sizes)


def to_device(images: Tensor, labels: Tensor, device: torch.device, dtype: torch.dtype,
              channels_last: bool) -> tuple[Tensor, Tensor]:
    """A uint8 batch as normalised ``dtype`` inputs on ``device`` (converted there)."""
    images = normalize(images.to(device, non_blocking=True), dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)
