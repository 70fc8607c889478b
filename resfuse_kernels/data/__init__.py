"""Dataset readers: Tiny-ImageNet / TinyImageNet-100 folders (Pillow)."""

from .tiny_imagenet import (TinyImageNet, list_images, load_image, load_tensors, normalize,
                            read_wnids, read_words)

__all__ = ["TinyImageNet", "list_images", "load_image", "load_tensors", "normalize",
           "read_wnids", "read_words"]
