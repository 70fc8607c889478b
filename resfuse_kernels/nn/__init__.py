"""Drop-in blocks of the paper's networks, reference or fused."""

from .blocks import (BasicBlock, FusableBlock, HighwayBlock, PlainBlock, ResFuseBlock,
                     batch_norm_args)
from .convert import convert

__all__ = ["BasicBlock", "FusableBlock", "HighwayBlock", "PlainBlock", "ResFuseBlock",
           "batch_norm_args", "convert"]
