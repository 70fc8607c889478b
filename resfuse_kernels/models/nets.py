"""The paper's networks, built from :mod:`.configs`.

Module names follow torchvision's ResNets (``conv1``, ``bn1``, ``layer1``...,
``fc``), so ``resnet34``'s state_dict keys are torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import BasicBlock, HighwayBlock, PlainBlock, ResFuseBlock
from .configs import CONFIGS, NetConfig


def _block(kind: str, in_channels: int, out_channels: int, stride: int, fused: bool,
           shortcut: str) -> nn.Module:
    if kind == "basic":
        return BasicBlock(in_channels, out_channels, stride, fused=fused, shortcut=shortcut)
    if kind == "plain":
        return PlainBlock(in_channels, out_channels, stride)
    if kind in ("highway", "resfuse"):
        if stride != 1 or in_channels != out_channels:
            raise ValueError(f"a {kind} block keeps its shape; put a basic or plain block "
                             f"first in a stage that changes it")
        if kind == "highway":
            return HighwayBlock(out_channels, fused=fused)
        return ResFuseBlock(out_channels, fused=fused)
    raise ValueError(f"unknown block kind {kind!r}")


class Net(nn.Module):
    """Stem, stages of blocks, global average pool and a linear classifier."""

    def __init__(self, config: NetConfig, num_classes: int = 100, fused: bool = False) -> None:
        super().__init__()
        if len(config.stages) != len(config.widths):
            raise ValueError("a configuration needs one width per stage")
        width = config.widths[0]
        if config.stem == "3x3":
            self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif config.stem == "7x7":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            raise ValueError(f"unknown stem {config.stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_channels = width
        for index, (kinds, out_channels) in enumerate(zip(config.stages, config.widths)):
            blocks = [_block(kind, in_channels if i == 0 else out_channels, out_channels,
                             2 if index > 0 and i == 0 else 1, fused, config.shortcut)
                      for i, kind in enumerate(kinds)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels = out_channels
        self.num_stages = len(config.stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(name: str, num_classes: int = 100, fused: bool = False) -> Net:
    """The network ``name`` (a key of :data:`CONFIGS`)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(CONFIGS)}")
    return Net(CONFIGS[name], num_classes=num_classes, fused=fused)


def resnet19(num_classes: int = 100, fused: bool = False) -> Net:
    """ResNet-19: basic blocks (2, 3, 3), option-A shortcuts; 4,235,172 parameters."""
    return build("resnet19", num_classes, fused)


def highway19(num_classes: int = 100, fused: bool = False) -> Net:
    """Highway-19: highway blocks, plain blocks between stages; 4,235,172 parameters."""
    return build("highway19", num_classes, fused)


def resfuse19(num_classes: int = 100, fused: bool = False) -> Net:
    """ResFuse-19: a ResFuse pair per stage; 4,322,084 parameters."""
    return build("resfuse19", num_classes, fused)


def resnet25(num_classes: int = 100, fused: bool = False) -> Net:
    """ResNet-25: basic blocks (3, 4, 4), our choice (see configs); 5,785,252 parameters."""
    return build("resnet25", num_classes, fused)


def resfuse25(num_classes: int = 100, fused: bool = False) -> Net:
    """ResFuse-25: ResNet-25 with a carry over one pair per stage; 5,872,164 parameters."""
    return build("resfuse25", num_classes, fused)


def resnet34(num_classes: int = 100, fused: bool = False) -> Net:
    """The classical ImageNet ResNet-34 (7x7 stem, option-B shortcuts).

    21,797,672 parameters with ``num_classes=1000``, as torchvision's.
    """
    return build("resnet34", num_classes, fused)
