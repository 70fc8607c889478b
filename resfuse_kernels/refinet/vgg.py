"""VGG-16 and VGG-16-BN with torchvision's module names, built here.

The paper's level 1 is a VGG-16 pretrained on ImageNet-1000 (Caffe's
weights) with its last two layers retrained. These builders give the same
modules as ``torchvision.models.vgg16`` / ``vgg16_bn`` (``features.N``,
``avgpool``, ``classifier.N``), so a user's own torchvision or
Caffe-converted checkpoint loads with :func:`load_weights`; torchvision is
not imported and nothing is ever downloaded.
"""

from __future__ import annotations

import os
from typing import Union

import torch
from torch import Tensor, nn

# Configuration "D" of Simonyan & Zisserman: channels of each 3x3 conv, "M" a 2x2 max-pool.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# The paper shares "the first 10 layers ... up to the output of conv4": conv1_1 .. conv4_3.
SHARED_CONVS = 10
# The layers the paper retrains on level 1: the last two fully connected ones.
RETRAINED = ("classifier.3", "classifier.6")
# Caffe's VGG weights expect BGR pixels in 0..255 less these channel means (B, G, R).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class VGG(nn.Module):
    """torchvision's VGG: ``features``, ``avgpool`` (7x7), ``classifier``."""

    def __init__(self, batch_norm: bool = False, num_classes: int = 1000,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(channels, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def features_length(batch_norm: bool) -> int:
    """The number of modules in ``features``: 31, or 44 with BatchNorm."""
    return sum(1 if v == "M" else 2 + batch_norm for v in VGG16)


def shared_end(batch_norm: bool, convs: int = SHARED_CONVS) -> int:
    """The index in ``features`` just past the ReLU of the ``convs``-th conv
    (23 for VGG-16, 33 for VGG-16-BN: conv4_3's output)."""
    seen, index = 0, 0
    for v in VGG16:
        index += 1 if v == "M" else (3 if batch_norm else 2)
        seen += v != "M"
        if seen == convs:
            return index
    raise ValueError(f"VGG-16 has {seen} convolutions, {convs} asked for")


def load_weights(model: nn.Module, path: Union[str, os.PathLike],
                 reinit: tuple[str, ...] = ()) -> list[str]:
    """Load the state_dict saved at ``path`` into ``model``, strictly.

    ``torch.load(weights_only=True)``: tensors only, no code from the file.
    Every key must match (missing or unexpected keys are an error that lists
    them) and every shape, except the parameters of the modules named in
    ``reinit`` (e.g. the last layer, ``classifier.6``, of a 1000-class
    checkpoint for a 100-class level 1), which keep their fresh
    initialisation when the shapes differ. Returns the keys so kept.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        hint = (" (a VGG-16-BN checkpoint has BatchNorm keys: pick the matching architecture)"
                if any(".running_mean" in k for k in missing + unexpected) else "")
        raise ValueError(f"{path} does not match the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}{hint}")
    kept = []
    for key, value in own.items():
        if state[key].shape != value.shape:
            if key.rsplit(".", 1)[0] in reinit:
                kept.append(key)
                state[key] = value
            else:
                raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, the "
                                 f"model's is {tuple(value.shape)}")
    model.load_state_dict(state)
    return kept


def vgg16(num_classes: int = 1000, batch_norm: bool = False,
          weights: Union[str, os.PathLike, None] = None) -> VGG:
    """VGG-16 (``batch_norm=True``: VGG-16-BN), optionally loaded from the
    user's checkpoint ``weights``; the last layer is re-initialised when the
    checkpoint has another number of classes (the paper retrains it)."""
    model = VGG(batch_norm, num_classes)
    if weights is not None:
        load_weights(model, weights, reinit=("classifier.6",))
    return model


class CaffeInput(nn.Module):
    """Standardised RGB (ImageNet mean/std, :func:`~resfuse_kernels.data.normalize`)
    to what Caffe's VGG weights expect: BGR in 0..255 less the channel means."""

    def __init__(self) -> None:
        super().__init__()
        from ..data.tiny_imagenet import MEAN, STD

        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("caffe", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        rgb255 = (x * self.std + self.mean) * 255
        return rgb255.flip(1) - self.caffe


class Resize(nn.Module):
    """The paper's input: resized to ``size`` (bilinear), centre crop ``crop``."""

    def __init__(self, size: int = 256, crop: int = 224) -> None:
        super().__init__()
        if crop > size:
            raise ValueError(f"crop {crop} larger than size {size}")
        self.size, self.crop = size, crop

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                      align_corners=False)
        o = (self.size - self.crop) // 2
        return x[:, :, o:o + self.crop, o:o + self.crop]
