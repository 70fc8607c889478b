"""Datasets: Tiny-ImageNet / TinyImageNet-100 folders (Pillow), learnable synthetic images."""

from .synthetic import SyntheticImages
from .tiny_imagenet import (TinyImageNet, list_images, load_image, load_tensors, normalize,
                            read_wnids, read_words)

__all__ = ["SyntheticImages", "TinyImageNet", "list_images", "load_image", "load_tensors",
           "normalize", "read_wnids", "read_words"]
