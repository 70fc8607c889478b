"""The network configurations, in one place (DESIGN.md section 2).

A configuration names the block kinds of each stage. The first block of
every stage after the first has stride 2 and doubles the width. Kinds:

* ``basic``   -- :class:`~resfuse_kernels.nn.BasicBlock` (2 convolutions)
* ``plain``   -- :class:`~resfuse_kernels.nn.PlainBlock` (2 convolutions)
* ``highway`` -- :class:`~resfuse_kernels.nn.HighwayBlock` (2 convolutions)
* ``resfuse`` -- :class:`~resfuse_kernels.nn.ResFuseBlock`, a pair of basic
  blocks (4 convolutions) with a 1x1 carry

Depth. The paper names its nets by depth without defining it; the 19-layer
nets have 8 two-convolution blocks, i.e. 16 convolutions + 3. We keep that
rule (depth = 2 x blocks + 3, the carry not counted), so 25 layers means 11
blocks. The paper gives no configuration for them; we add one basic block to
each stage of ResNet-19, (2, 3, 3) -> (3, 4, 4), the way torchvision's
deeper ResNets grow every stage. ResFuse-25 has the same 11 blocks and the
same three carries as ResFuse-19: in each stage the pair comes first, as in
ResFuse-19, and the odd block out stays a basic block (a carry needs a pair).
It therefore has ResNet-25's parameters plus ResFuse-19's 86,912 carry
parameters, as ResFuse-19 relates to ResNet-19.
"""

from __future__ import annotations

from dataclasses import dataclass

# Parameter counts in the paper's Table 3 (100 classes), shown beside ours
# by the reports. tests/test_models.py pins ours, the 25-layer nets' too.
PAPER_PARAMETERS = {
    "resnet19": 4_235_172,
    "highway19": 4_235_172,
    "resfuse19": 4_322_084,
}


@dataclass(frozen=True)
class NetConfig:
    """A network: the block kinds per stage, the widths and the stem."""

    stages: tuple[tuple[str, ...], ...]
    widths: tuple[int, ...] = (64, 128, 256)
    stem: str = "3x3"          # "3x3": conv3x3 stride 1 (64x64 inputs); "7x7": ImageNet
    shortcut: str = "A"        # BasicBlock shortcut when shape changes


_B = "basic"

CONFIGS: dict[str, NetConfig] = {
    "resnet19": NetConfig(((_B,) * 2, (_B,) * 3, (_B,) * 3)),
    "highway19": NetConfig((("highway", "highway"),
                            ("plain", "highway", "highway"),
                            ("plain", "highway", "highway"))),
    "resfuse19": NetConfig((("resfuse",), (_B, "resfuse"), (_B, "resfuse"))),
    "resnet25": NetConfig(((_B,) * 3, (_B,) * 4, (_B,) * 4)),
    "resfuse25": NetConfig((("resfuse", _B), (_B, "resfuse", _B), (_B, "resfuse", _B))),
    # The classical ImageNet ResNet-34 (He et al. 2016; torchvision's layout).
    "resnet34": NetConfig(((_B,) * 3, (_B,) * 4, (_B,) * 6, (_B,) * 3),
                          widths=(64, 128, 256, 512), stem="7x7", shortcut="B"),
}
