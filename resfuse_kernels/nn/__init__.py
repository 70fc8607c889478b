"""Drop-in blocks of the paper's networks, reference or fused."""

from .blocks import (BasicBlock, FusableBlock, HighwayBlock, PlainBlock, ResFuseBlock,
                     batch_norm_args)
from .convert import ConvertReport, Fused, Skipped, convert
from .fused_tail import bn_add_relu

__all__ = ["BasicBlock", "ConvertReport", "FusableBlock", "Fused", "HighwayBlock", "PlainBlock",
           "ResFuseBlock", "Skipped", "batch_norm_args", "bn_add_relu", "convert"]
