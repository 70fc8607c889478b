"""The paper's building blocks, each with a reference and a fused forward.

A block built with ``fused=True`` (or switched by :func:`resfuse_kernels.convert`)
runs its tail through a fused op; it has exactly the parameters, buffers and
state_dict keys of its reference twin, so checkpoints move between the two
unchanged and, with the same weights, both compute the same function.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference
from .sync_bn import group_of


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def batch_norm_args(bn: nn.BatchNorm2d, like: Optional[Tensor] = None) -> dict:
    """What ``bn.forward`` would hand to ``F.batch_norm``, with its bookkeeping done.

    Mirrors ``nn.BatchNorm2d.forward``: in training with running statistics
    it increments ``num_batches_tracked`` and, for ``momentum=None``, uses the
    cumulative average ``1 / num_batches_tracked`` (kept as a tensor, so no
    host sync and no graph break). ``process_group``: the group whose
    statistics a synchronising BatchNorm uses (nn.SyncBatchNorm,
    :class:`~resfuse_kernels.nn.sync_bn.CpuSyncBatchNorm`), else None. A
    missing weight or bias (``affine=False``, or ``bias=False``) is weight 1
    or bias 0, exactly, when ``like`` (the activation) is given to make them
    on its device.
    """
    weight, bias = bn.weight, bn.bias
    if weight is None or bias is None:
        if like is None:
            raise ValueError(
                f"the fused blocks need a BatchNorm with a weight and a bias (affine=True and, "
                f"torch >= 2.13, bias=True); this one has "
                f"{'affine=False' if not bn.affine else 'bias=False'}. rk.convert fuses such "
                f"BatchNorms in other models (as weight 1, bias 0)")
        given = weight if weight is not None else bn.running_mean
        dtype = given.dtype if given is not None else like.dtype
        if weight is None:
            weight = torch.ones(bn.num_features, dtype=dtype, device=like.device)
        if bias is None:
            bias = torch.zeros(bn.num_features, dtype=dtype, device=like.device)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # in float64, as nn.BatchNorm2d's Python float
            momentum = 1.0 / bn.num_batches_tracked.to(torch.float64)
    uses_running = not bn.training or bn.track_running_stats
    return dict(weight=weight, bias=bias,
                running_mean=bn.running_mean if uses_running else None,
                running_var=bn.running_var if uses_running else None,
                training=bn.training or (bn.running_mean is None and bn.running_var is None),
                momentum=momentum, eps=bn.eps, process_group=group_of(bn))


def _one_group(first: dict, second: dict, names: str):
    """The process group two BatchNorms of one fused op share."""
    if first["training"] != second["training"]:
        raise ValueError(f"{names} must both use batch statistics or both running ones")
    if first["process_group"] is not second["process_group"]:
        raise ValueError(f"{names} must both be synchronised over one process group, or neither")
    return first["process_group"]


class FusableBlock(nn.Module):
    """A block whose tail can run through a fused op (``self.fused``)."""

    fused: bool


class BasicBlock(FusableBlock):
    """ResNet v1 basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity when shape is kept. When the stride or the
    width changes it is option A (``shortcut="A"``, the paper's): ``x``
    subsampled by the stride, zero channels appended, no parameters; or
    option B (``"B"``, ImageNet ResNets): a strided 1x1 convolution and
    BatchNorm in ``downsample``. Fused, the tail ``relu(bn2(u) + identity)``
    is one :func:`~resfuse_kernels.ops.resfuse_tail` without carry.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 fused: bool = False, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if out_channels < in_channels:
            raise ValueError(f"a basic block cannot narrow: {in_channels} -> {out_channels}")
        self.fused = fused
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: Optional[nn.Sequential] = None
        if shortcut == "B" and (stride != 1 or in_channels != out_channels):
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride),
                                            nn.BatchNorm2d(out_channels))

    def shortcut(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.out_channels != self.in_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))
        return x

    def forward(self, x: Tensor) -> Tensor:
        u = self.conv2(F.relu(self.bn1(self.conv1(x))))
        identity = self.shortcut(x)
        if not self.fused:
            return reference.resfuse_tail(u, identity, self.bn2)
        d = batch_norm_args(self.bn2)
        return ops.resfuse_tail(u, identity, d["weight"], d["bias"], d["running_mean"],
                                d["running_var"], training=d["training"],
                                momentum_d=d["momentum"], eps_d=d["eps"],
                                process_group=d["process_group"])

    def extra_repr(self) -> str:
        return f"fused={self.fused}"


class PlainBlock(nn.Module):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU, no shortcut.

    Highway-19 changes width with it (first convolution strided).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class HighwayBlock(FusableBlock):
    """Highway block (paper eq. 3): ``y = H * T + x * (1 - T)``.

    ``H = relu(bn_h(conv_h(x)))`` and the gate ``T = sigmoid(bn_t(conv_t(x)))``
    come from two parallel 3x3 convolutions, so the block has exactly the
    parameters of a basic block. The gate bias is ``bn_t.bias``, initialised
    to ``gate_bias`` (negative: the block starts close to the identity;
    -2.0 is Srivastava et al.'s value for their 19-layer CIFAR-100 net).
    Fused, everything after the two convolutions is one
    :func:`~resfuse_kernels.ops.highway_gate`.
    """

    def __init__(self, channels: int, gate_bias: float = -2.0, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.gate_bias = gate_bias
        self.conv_h = conv3x3(channels, channels)
        self.bn_h = nn.BatchNorm2d(channels)
        self.conv_t = conv3x3(channels, channels)
        self.bn_t = nn.BatchNorm2d(channels)
        nn.init.constant_(self.bn_t.bias, gate_bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.conv_h(x), self.conv_t(x)
        if not self.fused:
            return reference.highway_gate(a, b, x, self.bn_h, self.bn_t)
        h, t = batch_norm_args(self.bn_h), batch_norm_args(self.bn_t)
        group = _one_group(h, t, "bn_h and bn_t")
        return ops.highway_gate(a, b, x, h["weight"], h["bias"], h["running_mean"],
                                h["running_var"], t["weight"], t["bias"], t["running_mean"],
                                t["running_var"], training=h["training"],
                                momentum_h=h["momentum"], momentum_t=t["momentum"],
                                eps_h=h["eps"], eps_t=t["eps"], process_group=group)

    def extra_repr(self) -> str:
        return f"gate_bias={self.gate_bias}, fused={self.fused}"


class ResFuseBlock(FusableBlock):
    """A ResFuse pair (paper eq. 5): two basic blocks and a learned 1x1 carry.

    ``h = block1(x)``, ``u = conv2(relu(bn1(conv1(h))))`` and
    ``y = relu(bn2(u) + h + carry_bn(carry(x)))``. Width and resolution are
    kept (the stage's first, strided block is a plain :class:`BasicBlock`).
    The carry adds ``c * c + 2 * c`` parameters. Fused, both blocks' tails
    are :func:`~resfuse_kernels.ops.resfuse_tail`, the second with the carry.
    """

    def __init__(self, channels: int, fused: bool = False) -> None:
        super().__init__()
        self.block1 = BasicBlock(channels, channels, fused=fused)
        self.conv1 = conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.carry = conv1x1(channels, channels)
        self.carry_bn = nn.BatchNorm2d(channels)
        self.fused = fused

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        self.block1.fused = bool(value)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block1(x)
        u = self.conv2(F.relu(self.bn1(self.conv1(h))))
        if not self.fused:
            return reference.resfuse_tail(u, h, self.bn2, x, self.carry, self.carry_bn)
        d, k = batch_norm_args(self.bn2), batch_norm_args(self.carry_bn)
        group = _one_group(d, k, "bn2 and carry_bn")
        return ops.resfuse_tail(u, h, d["weight"], d["bias"], d["running_mean"],
                                d["running_var"], x, self.carry.weight, k["weight"], k["bias"],
                                k["running_mean"], k["running_var"], training=d["training"],
                                momentum_d=d["momentum"], momentum_k=k["momentum"],
                                eps_d=d["eps"], eps_k=k["eps"], process_group=group)

    def extra_repr(self) -> str:
        return f"fused={self.fused}"
